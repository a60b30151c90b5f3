"""One registry of architecture families per task, timm-style: a family registers itself.

A family is a builder `fn(num_classes, in_channels, image_size, **hparams) -> nn.Module`
plus its hyperparameter space, declared next to it:

    @register("classify", "resnet", space={"depth": Choice([8, 14, 20]), "width": Choice([16, 32])})
    def resnet(num_classes, in_channels, image_size, depth=8, width=16): ...

The builder's signature is the only home of the family's defaults (as timm's `@register_model`):
the registry reads them from it, and hands each build its own copy (so a `backbone_hparams={}`
default is never shared). A task exists once a family registers for it.

Output conventions, the same for every family of a task:
- classify: logits [N, num_classes]; in train mode a family with auxiliary heads
  returns `AuxLogits(logits, aux=[...])` (auxiliary losses count in training only).
- detect: a torchvision detection model (list of images in, list of dicts
  `boxes`/`labels`/`scores`[/`masks`] out in eval mode, a dict of losses in train
  mode). `num_classes` counts object classes; label 0 is background inside torchvision,
  so class index c is label c + 1.
- segment: logits [N, num_classes + 1, H, W] at the input resolution, channel 0 =
  background, channel c + 1 = class c.
- regress: values [N, num_classes] (one per target) in the targets' units: every classify family
  is also a regress family, wrapped by `regressor` (its head predicts standardized targets;
  `target_mean`/`target_std` are hparams, so config.json holds them).

Every family works for image_size >= 8 (models/_stages.py `stride_plan` drops the strides that
would shrink the last feature map below 2 px). Every model keeps its backbone stages in an
`nn.Sequential` named `features` (item 0 = stem): detectors and segmenters take a registry
classifier's `features` as their backbone (`backbone`, `backbone_hparams` hparams), and every
family also takes the transfer hparams `pretrained`, `freeze`, `freeze_bn` (models/_checkpoint.py).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

# What every builder takes first; the hyperparameters are the keyword parameters after them.
INPUTS = ("num_classes", "in_channels", "image_size")


class AuxLogits(NamedTuple):
    """Train-mode output of a classifier with auxiliary heads (GoogLeNet)."""

    logits: Tensor
    aux: list[Tensor]


@dataclass(frozen=True)
class Choice:
    """A categorical hyperparameter."""

    values: Sequence[Any]


@dataclass(frozen=True)
class IntRange:
    """An integer hyperparameter in [low, high]."""

    low: int
    high: int
    log: bool = False


@dataclass(frozen=True)
class FloatRange:
    """A float hyperparameter in [low, high]."""

    low: float
    high: float
    log: bool = False


Space = dict[str, Choice | IntRange | FloatRange]


@dataclass(frozen=True)
class Family:
    task: str
    name: str
    builder: Callable[..., nn.Module]
    space: Space = field(default_factory=dict)
    paper: str = ""

    @property
    def defaults(self) -> dict[str, Any]:
        """The builder's hyperparameters and their default values, read from its signature (a fresh copy)."""
        return copy.deepcopy(_signature_defaults(self.builder))

    @property
    def trunk_key(self) -> str | None:
        """The hparam naming the classifier whose trunk this family builds on (`backbone`, `encoder`), if any."""
        return next((key for key in TRUNK_KEYS if key in _signature_defaults(self.builder)), None)

    @property
    def takes_trunk(self) -> bool:
        """Whether a classifier's trained trunk can start this family: a classifier (or the regressor wrapping
        one) is a trunk and a head; detectors, segmenters and autoencoders take one as their `trunk_key`."""
        return self.task in (BACKBONE_TASK, REGRESS_TASK) or self.trunk_key is not None


def _signature_defaults(builder: Callable[..., nn.Module]) -> dict[str, Any]:
    params = list(inspect.signature(builder).parameters.values())
    return {p.name: p.default for p in params[len(INPUTS):] if p.default is not inspect.Parameter.empty}


_REGISTRY: dict[str, dict[str, Family]] = {}
# Detectors and segmenters take the `features` of one of this task's families as their trunk.
BACKBONE_TASK = "classify"
# The hparams naming that family (its own hparams: `<key>_hparams`), by the kind of model that takes it.
TRUNK_KEYS = ("backbone", "encoder")
# (in_channels, image_size) each task's families are profiled at (`python -m models.summary`): the
# default data, Fashion-MNIST items and the 64 px scenes composed from them.
PROFILE_INPUT = {"classify": (1, 28), "detect": (1, 64), "segment": (1, 64)}
# Every family of BACKBONE_TASK is also a family of REGRESS_TASK, wrapped by `regressor` (no per-family code).
REGRESS_TASK = "regress"
PROFILE_INPUT[REGRESS_TASK] = PROFILE_INPUT[BACKBONE_TASK]
# Encoder-decoders restore the classify items they are trained on (models/autoencoder.py, models/unet.py);
# a trained autoencoder's encoder is a BACKBONE_TASK trunk, loaded whole or not at all (models/_checkpoint.py).
RECONSTRUCT_TASK = "reconstruct"
PROFILE_INPUT[RECONSTRUCT_TASK] = PROFILE_INPUT[BACKBONE_TASK]


def register(task: str, name: str, *, space: Space | None = None,
             paper: str = "") -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register `builder` as family `name` of `task` with its search space."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY.get(task, {}):
            raise ValueError(f"family {name!r} is registered twice for {task}")
        inputs = tuple(inspect.signature(builder).parameters)[:len(INPUTS)]
        if inputs != INPUTS:
            raise TypeError(f"{task} family {name!r}: the builder must take {', '.join(INPUTS)} first, "
                            f"got {', '.join(inputs)}")
        undefaulted = set(space or {}) - set(_signature_defaults(builder))
        if undefaulted:
            raise TypeError(f"{task} family {name!r}: searched hyperparameter(s) {sorted(undefaulted)} "
                            "need a default in the builder's signature")
        _REGISTRY.setdefault(task, {})[name] = Family(task, name, builder, dict(space or {}), paper)
        return builder

    return decorate


_loaded = False


def _load_families() -> None:
    """Import every module of the `models` package once, so their decorators run."""
    global _loaded
    if _loaded:
        return
    import models

    for info in pkgutil.iter_modules(models.__path__):
        if not info.name.startswith("_") and info.name != "summary":  # infrastructure is _private
            importlib.import_module(f"models.{info.name}")
    for fam in _REGISTRY.get(BACKBONE_TASK, {}).values():
        _REGISTRY.setdefault(REGRESS_TASK, {})[fam.name] = Family(REGRESS_TASK, fam.name, regressor(fam.builder),
                                                                 fam.space, fam.paper)
    _loaded = True


class Regressor(nn.Module):
    """A classifier built with one output per target: its head (linear on the pooled features) predicts the
    standardized targets, and the output is in the targets' own units (`target_mean`, `target_std`)."""

    def __init__(self, net: nn.Module, target_mean: Sequence[float], target_std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        # Not in the state dict: the config's hparams are their one home (the served model's units).
        self.register_buffer("target_mean", torch.tensor(target_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("target_std", torch.tensor(target_std, dtype=torch.float32), persistent=False)

    def standardized(self, x: Tensor) -> Tensor:
        """The head's output [N, K]: (target - target_mean) / target_std (auxiliary heads dropped)."""
        out = self.net(x)
        return out.logits if isinstance(out, AuxLogits) else out

    def forward(self, x: Tensor) -> Tensor:
        return self.standardized(x) * self.target_std + self.target_mean


def regressor(classifier: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """A regression builder from a classifier builder: its hyperparameters plus the targets' standardisation
    (`target_mean`, `target_std`: one value per target; None = 0 and 1)."""

    def builder(num_classes: int, in_channels: int, image_size: int, target_mean: Sequence[float] | None = None,
                target_std: Sequence[float] | None = None, **hparams: Any) -> nn.Module:
        net = classifier(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **hparams)
        return Regressor(net, list(target_mean or [0.0] * num_classes), list(target_std or [1.0] * num_classes))

    signature = inspect.signature(classifier)
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
             for name in ("target_mean", "target_std")]
    builder.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    builder.__name__ = builder.__qualname__ = f"{classifier.__name__}_regressor"
    return builder


def tasks() -> list[str]:
    """The task names some family registers for, sorted."""
    _load_families()
    return sorted(_REGISTRY)


def families(task: str) -> list[str]:
    """The family names registered for `task`, sorted."""
    if task not in tasks():
        raise KeyError(f"unknown task {task!r}; tasks are {', '.join(tasks())}")
    return sorted(_REGISTRY[task])


def family(task: str, name: str) -> Family:
    """The registered family, or a KeyError that lists the valid names."""
    names = families(task)
    if name not in _REGISTRY[task]:
        raise KeyError(f"unknown {task} family {name!r}; known: {', '.join(names)}")
    return _REGISTRY[task][name]


# Hyperparameters every family takes: transfer learning, applied after the builder runs
# (models._checkpoint.apply_transfer): `pretrained` (a saved registry model's directory or
# "torchvision:<weights>"), `freeze` (first N stages of `features`), `freeze_bn`.
TRANSFER_KEYS = ("pretrained", "freeze", "freeze_bn")


def build(task: str, family_name: str, num_classes: int, in_channels: int, image_size: int,
          **hparams: Any) -> nn.Module:
    """Build a model of `family_name` for `task`; unspecified hparams take the family's defaults."""
    fam = family(task, family_name)
    transfer = {key: hparams.pop(key) for key in TRANSFER_KEYS if key in hparams}
    known = fam.defaults
    unknown = set(hparams) - set(known)
    if unknown:
        raise KeyError(f"{task} family {family_name!r} has no hyperparameter(s) {sorted(unknown)}; "
                       f"known: {sorted(set(known) | set(TRANSFER_KEYS))}")
    model = fam.builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                        **{**known, **hparams})
    if any(transfer.values()):
        from models._checkpoint import apply_transfer

        apply_transfer(model, **transfer)
    return model
