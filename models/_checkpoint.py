"""Saving and loading registry models (safetensors weights + JSON config, never a pickled module),
and transfer learning: weights from a saved registry model or torchvision's cache, frozen stages.

On disk, a model is a directory with `model.safetensors` (its state_dict) and `config.json`
(`task`, `family`, `num_classes`, `in_channels`, `image_size`, `hparams`, `weights_sha256`, plus
whatever else the caller adds); `load` rebuilds it through the registry.

Transfer learning follows Yosinski et al. 2014 ("How transferable are features in deep neural
networks?"): a trunk's first stages compute general features that transfer across tasks, so they are
loaded from a trained model and may stay frozen, with Keras's `trainable=False` semantics: no
gradients, and their BatchNorm layers normalize with, and never update, their running statistics.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from models._registry import RECONSTRUCT_TASK, build
from models._errors import ConvForgeError
from models._files import sha256_file, write_json

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# Written next to config.json once the model is registered: never part of config.json, which the
# registry's logged copy of the model shares byte for byte.
REGISTRATION = "registration.json"
REQUIRED = ("task", "family", "num_classes", "in_channels", "image_size", "hparams")
TRUNK = "features."  # every registry model keeps its backbone stages under a module named `features`
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class CheckpointError(ConvForgeError):
    """A saved model that cannot be used: missing files, a hash mismatch, weights that do not fit."""


def _plain_state(model: nn.Module) -> dict[str, Tensor]:
    """The state_dict as contiguous CPU tensors, shared storage cloned (safetensors refuses aliases)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper would prefix every name
    seen: set[tuple[int, int]] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and key in seen:
            tensor = tensor.clone()
        seen.add(key)
        state[name] = tensor
    return state


def save(model: nn.Module, config: dict[str, Any], directory: Path) -> str:
    """Write `model.safetensors` and `config.json` (with `weights_sha256`) into `directory`; returns the hash."""
    missing = [key for key in REQUIRED if key not in config]
    if missing:
        raise ValueError(f"checkpoint config lacks {missing}; it needs {list(REQUIRED)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Temp file + rename, so a reader never sees half the weights; the config goes last and
    # carries the hash, so an old config never vouches for new weights.
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=".model.", suffix=".tmp")
    os.close(handle)
    try:
        # One metadata entry: safetensors writes its metadata in hash-map order, which changes from save to save,
        # so two entries would give the same weights other bytes, another weights_sha256 and DVC hash.
        label = json.dumps({"task": str(config["task"]), "family": str(config["family"])}, sort_keys=True)
        save_file(_plain_state(model), tmp, metadata={"convforge": label})
        os.chmod(tmp, 0o644)
        sha = sha256_file(Path(tmp))
        os.replace(tmp, directory / WEIGHTS)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    config["weights_sha256"] = sha
    write_json(directory / CONFIG, config)
    return sha


def read_config(directory: Path) -> dict[str, Any]:
    """The config.json of a saved model, checked for the keys `load` needs."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"no saved model at {directory}: {CONFIG} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    missing = [key for key in REQUIRED if key not in config]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}")
    return config


def read_weights(directory: Path, expected_sha256: str | None = None, device: str | torch.device = "cpu",
                 config: dict[str, Any] | None = None) -> dict[str, Tensor]:
    """The saved state_dict, after checking its SHA-256 against the config's and `expected_sha256`."""
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"no weights at {path}")
    sha = sha256_file(path)
    recorded = (config or {}).get("weights_sha256")
    for source, wanted in (("config.json", recorded), ("the expected hash", expected_sha256)):
        if wanted and wanted != sha:
            raise CheckpointError(f"{path} has SHA-256 {sha[:12]}..., but {source} says {wanted[:12]}...: "
                                  "the weights were changed or belong to another model")
    return load_file(path, device=str(device))


def read_registration(directory: Path) -> dict[str, Any]:
    """A saved model's registration.json (`registered_model`, `registered_version`), or {} if never registered."""
    path = Path(directory) / REGISTRATION
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def load(directory: Path, expected_sha256: str | None = None,
         device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the saved model through the registry, load its checked weights, return it in eval mode."""
    config = read_config(directory)
    state = read_weights(directory, expected_sha256, "cpu", config)
    # `pretrained` weights are overwritten by the saved ones anyway (and may not exist here).
    hparams = {k: v for k, v in config["hparams"].items() if k != "pretrained"}
    try:
        model = build(config["task"], config["family"], config["num_classes"], config["in_channels"],
                      config["image_size"], **hparams)
    except KeyError as exc:
        raise CheckpointError(f"cannot rebuild the model saved at {directory}: {exc.args[0]}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"the weights at {directory} do not fit {config['family']}: "
                              f"{first[-1].strip()}") from None
    return model.to(device).eval(), config


# --- transfer learning ----------------------------------------------------------------------------


def _torchvision_state(spec: str) -> dict[str, Tensor]:
    """ImageNet weights `torchvision:<Weights enum>` (e.g. ResNet18_Weights.IMAGENET1K_V1),
    from the local cache only."""
    from torchvision.models import get_weight

    name = spec.split(":", 1)[1]
    try:
        weights = get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise ConvForgeError(f"pretrained: unknown torchvision weights {name!r} "
                             "(use e.g. torchvision:ResNet18_Weights.IMAGENET1K_V1)") from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not path.is_file():
        raise ConvForgeError(f"pretrained: {name} is not in the local torch cache ({path}); ConvForge never "
                             f"downloads weights: fetch {weights.url} into that folder first")
    return torch.load(path, map_location="cpu", weights_only=True)


def _rename_torchvision(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision ResNet names (conv1, bn1, layerK) onto the registry's (features.0.*, features.K.*)."""
    out = {}
    for name, tensor in state.items():
        head, _, rest = name.partition(".")
        if head in ("conv1", "bn1"):
            name = f"{TRUNK}0.{'0' if head == 'conv1' else '1'}.{rest}"
        elif head.startswith("layer") and head[5:].isdigit():
            name = f"{TRUNK}{head[5:]}.{rest}"
        out[name] = tensor
    return out


def _trunk_key(name: str) -> str:
    """A parameter's name relative to its model's `features` trunk (unchanged when outside it)."""
    before, marker, after = name.partition(TRUNK)
    return marker + after if marker and (not before or before.endswith(".")) else name


def load_matching(model: nn.Module, source: dict[str, Tensor]) -> dict[str, Any]:
    """Copy every source tensor whose trunk-relative name and shape match one of `model`'s; returns counts
    (`trunk_matched` of the `trunk` tensors of `model` below `features.`)."""
    by_key = {_trunk_key(name): tensor for name, tensor in source.items()}
    target = model.state_dict()
    matched, wrong_shape = {}, []
    for name, tensor in target.items():
        found = by_key.get(_trunk_key(name))
        if found is None:
            continue
        if found.shape == tensor.shape:
            matched[name] = found.to(tensor.dtype)
        else:
            wrong_shape.append(name)
    model.load_state_dict(matched, strict=False)
    trunk = [name for name in target if _trunk_key(name).startswith(TRUNK)]
    return {"matched": len(matched), "wrong_shape": len(wrong_shape), "target": len(target), "source": len(source),
            "trunk": len(trunk), "trunk_matched": sum(name in matched for name in trunk)}


def check_whole_trunk(report: dict[str, Any], config: dict[str, Any], pretrained: str) -> None:
    """An encoder-decoder's encoder initialises a trunk whole or not at all: a user error unless every trunk
    tensor of the model was matched (a partly initialised trunk would train as neither)."""
    if report["trunk_matched"] == report["trunk"]:
        return
    hparams = config.get("hparams", {})
    encoder = f"{hparams.get('encoder')} {hparams.get('encoder_hparams') or {}}" if "encoder" in hparams \
        else f"{config.get('family')} (not a classifier's trunk)"
    raise CheckpointError(f"pretrained: only {report['trunk_matched']}/{report['trunk']} trunk tensors match the "
                          f"encoder at {pretrained}, whose encoder is {encoder}: train it with this classifier's "
                          "family and hyperparameters as `encoder` and `encoder_hparams`")


def _freeze_bn(module: nn.Module) -> int:
    """Swap every BatchNorm2d below `module` for a FrozenBatchNorm2d holding its statistics; returns the count."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                if child.affine:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                if child.running_mean is not None:
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
            count += 1
        else:
            count += _freeze_bn(child)
    return count


def _find_trunk(model: nn.Module) -> nn.Sequential | None:
    """The model's `features` stages (the shallowest module of that name), None when it has none."""
    for name, module in model.named_modules():
        if name.rpartition(".")[2] == "features" and isinstance(module, nn.Sequential):
            return module
    return None


def _trunk_of(model: nn.Module) -> nn.Sequential:
    """The model's `features` stages, or a user error when it has none."""
    trunk = _find_trunk(model)
    if trunk is None:
        raise ConvForgeError(f"{type(model).__name__} has no `features` stages to freeze")
    return trunk


def trunk_parameters(model: nn.Module, stages: int) -> list[nn.Parameter]:
    """The still trainable parameters of the trunk's first `stages` stages: what `freeze: N` holds."""
    if stages == 0:
        return []
    trunk = _trunk_of(model)
    if stages < 0 or stages > len(trunk):
        raise ConvForgeError(f"freeze: expected 0..{len(trunk)} stages, got {stages}")
    return [p for p in trunk[:stages].parameters() if p.requires_grad]


def train_mode(model: nn.Module) -> nn.Module:
    """`model.train()`, except that the BatchNorm layers of frozen trunk stages stay in inference mode.

    A stage is frozen when it has parameters and none of them requires grad (`freeze`, as a hparam or
    a training key): as with Keras's `trainable=False`, its BN layers then use and keep their running
    statistics, which `model.train()` alone would go on updating. Call it instead of `model.train()`.
    """
    model.train()
    for stage in _find_trunk(model) or ():
        parameters = list(stage.parameters())
        if parameters and not any(p.requires_grad for p in parameters):
            for module in stage.modules():
                if isinstance(module, BATCH_NORMS):
                    module.eval()
    return model


def apply_transfer(model: nn.Module, pretrained: str | None = None, freeze: int = 0, freeze_bn: bool = False,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Load `pretrained` weights by name and shape, freeze the first `freeze` stages (and BN statistics).

    `pretrained` is a directory written by `save` (any task: a classifier's trunk fits a detector's
    or segmenter's backbone of the same family and hparams) or `torchvision:<Weights enum name>`,
    read from the local torch hub cache only. The report is also kept as `model.transfer_report`.
    Frozen stages keep their BN statistics when trained through `train_mode`; `freeze_bn` instead swaps
    every trunk BN for a FrozenBatchNorm2d (statistics and affine terms fixed for good).
    """
    report: dict[str, Any] = {"pretrained": pretrained, "frozen_stages": 0, "frozen_bn": 0}
    if pretrained:
        config: dict[str, Any] = {}  # a saved model's config.json (none for torchvision weights)
        if str(pretrained).startswith("torchvision:"):
            source = _rename_torchvision(_torchvision_state(str(pretrained)))
        else:
            directory = Path(pretrained).expanduser()
            config = read_config(directory)
            source = read_weights(directory, config=config)
            report["weights_sha256"] = config.get("weights_sha256")
        report.update(load_matching(model, source))
        if config.get("task") == RECONSTRUCT_TASK:
            check_whole_trunk(report, config, str(pretrained))
        if not report["matched"]:
            raise ConvForgeError(f"pretrained: no tensor of {pretrained} matches the model by name and shape "
                                 "(use the same backbone family and hyperparameters)")
        log(f"pretrained: loaded {report['matched']}/{report['target']} tensors from {pretrained}, "
            f"{report['trunk_matched']}/{report['trunk']} of the trunk "
            f"({report['wrong_shape']} with the right name but another shape were skipped)")
    if freeze or freeze_bn:
        stages = _trunk_of(model)
        if freeze < 0 or freeze > len(stages):
            raise ConvForgeError(f"freeze: expected 0..{len(stages)} stages, got {freeze}")
        for stage in list(stages)[:freeze]:
            stage.requires_grad_(False)
        report["frozen_stages"] = freeze
        if freeze_bn:
            # Fixed statistics and affine terms, as torchvision's detection backbones do.
            report["frozen_bn"] = _freeze_bn(stages)
    model.transfer_report = report
    return report
