"""What one training run is, for a search trial and the train stage alike: the TrainConfig of its epochs and the
model built from a family choice. A trial of E epochs is then the final training of E epochs on the trial's
items (tests/integration/test_trial_equals_final.py): the two differ only in their epochs and their data.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from models import build, family as registry_family
from models._checkpoint import apply_transfer
from pipelines.errors import ConvForgeError
from pipelines.geometry import family_geometry, geometry_hparams
from pipelines.params import TrainConfig
from pipelines.transfer import trunk_hparams


def run_config(cfg: TrainConfig, epochs: int | None = None, **choice: Any) -> TrainConfig:
    """`cfg` with a search choice's keys, for `epochs` epochs (default: its own), its warm-up cut to leave at
    least one epoch after it (a 1-epoch run has none: a warm-up over the whole run never reaches the rate)."""
    cfg = cfg.updated(**choice, **({"epochs": epochs} if epochs is not None else {}))
    return cfg.updated(warmup_epochs=min(cfg.warmup_epochs, cfg.epochs - 1))


def run_model(task: str, family_name: str, hparams: dict[str, Any], data: Any, seed: int,
              geometry: dict[str, Any] | None = None, pretrained: str | None = None,
              log: Callable[[str], None] | None = None) -> tuple[dict[str, Any], nn.Module, dict[str, Any] | None]:
    """The model a run trains: every hparam (the family's defaults, the detector geometry of `data`'s boxes or
    `geometry` when the caller worked it out, then `hparams`), built seeded, its trunk from the `pretrained`
    weights (a resolved source); returns the hparams, the model and how the weights loaded (None: none asked)."""
    family = registry_family(task, family_name)
    if pretrained and not family.takes_trunk:
        raise ConvForgeError(f"{task} family {family_name} has no classifier trunk to start from {pretrained}: "
                             f"train it from scratch (train.{task}.pretrained: null) or choose a family with a "
                             "backbone")
    log = log or (lambda message: None)
    defaults = family.defaults
    fitted = family_geometry(geometry, defaults) if geometry is not None else geometry_hparams(defaults, data)
    full = {**defaults, **fitted, **hparams}
    # A classifier's trunk comes with its family and hyperparameters, whatever backbone the search drew.
    trunk = trunk_hparams(family, pretrained)
    try:
        model = seeded_build(task, family_name, data, seed, {**full, **trunk})
    except ConvForgeError as exc:
        if not trunk:
            raise
        # e.g. LeNet-5's strides 1, 2, 8 give no feature pyramid: the search's own backbone, from scratch
        log(f"pretrained: the classifier's {trunk[family.trunk_key]} trunk does not fit {family_name} ({exc}); "
            f"{family_name} trains its {full[family.trunk_key]} {family.trunk_key} from scratch")
        return full, seeded_build(task, family_name, data, seed, full), None
    transfer = apply_transfer(model, pretrained=pretrained, log=log) if pretrained else None
    return {**full, **trunk}, model, transfer


def seeded_build(task: str, family_name: str, data: Any, seed: int, hparams: dict[str, Any]) -> nn.Module:
    """The family built for `data` with initial weights that depend on the seed only, not on what ran before in
    the process."""
    torch.manual_seed(seed)
    return build(task, family_name, len(data.classes), data.in_channels, data.image_size, **hparams)
