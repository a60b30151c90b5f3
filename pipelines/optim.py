"""The optimizer, the weight average and the per-step schedule of the training engine.

The learning rate (and SGD's momentum under one-cycle) is a pure function of the step, as in
nanoGPT's `get_lr(it)`: the engine sets it before every step, so a resumed run needs only the
step number, and a config changed between epochs (a tuner's PBT) takes effect at once. So is the
learning rate of the stages `freeze` holds: 0 while frozen, then `lr_at(step) * unfreeze_lr_scale`
from `unfreeze_epoch` on (gradual unfreezing with a lower rate for the earlier layers, Howard &
Ruder 2018, "Universal Language Model Fine-tuning for Text Classification", Sec. 3.2-3.3).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from pipelines.params import TrainConfig

WARMUP_START = 0.01  # the warm-up's first step runs at 1% of cfg.lr
# One-cycle (Smith 2018) with torch.optim.lr_scheduler.OneCycleLR's defaults: from
# cfg.lr / 25 up to cfg.lr within at most 30% of the run, then down to cfg.lr / 25 / 1e4, while
# SGD's momentum goes the other way between 0.95 and 0.85.
ONECYCLE_MAX_RISE = 0.3
ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 25.0, 1e4
ONECYCLE_MOMENTUM_LOW, ONECYCLE_MOMENTUM_HIGH = 0.85, 0.95


def make_optimizer(model: nn.Module, cfg: TrainConfig, held: Sequence[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (Sutskever et al. 2013) or AdamW (Loshchilov & Hutter 2019).

    No weight decay on biases and normalization parameters (1-D tensors), as is standard practice.
    `held`, the parameters of the frozen stages, get a second such pair of groups (marked
    `frozen_trunk`) whose rate `set_hyperparameters` scales by `trunk_lr_scale`: present from the
    start, so the optimizer's state loads the same before and after the unfreeze epoch.
    """
    kept = {id(p) for p in held}
    groups = _decay_groups([p for p in model.parameters() if p.requires_grad and id(p) not in kept], cfg)
    if held:
        groups += [{**group, "frozen_trunk": True} for group in _decay_groups(list(held), cfg)]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _decay_groups(parameters: list[nn.Parameter], cfg: TrainConfig) -> list[dict]:
    """Two param groups: the weights (decayed), then biases and normalization parameters (never decayed)."""
    return [{"params": [p for p in parameters if p.ndim > 1], "weight_decay": cfg.weight_decay},
            {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0}]


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of weights and buffers (Polyak & Juditsky 1992), or None when off."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps in the whole run (at least 1)."""
    return max(1, cfg.epochs * steps_per_epoch)


def lr_at(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """The learning rate of 0-based optimizer step `step`: warm-up then cosine, one-cycle, or warm-up then constant."""
    if cfg.schedule == "onecycle":
        return _one_cycle(step, cfg, steps_per_epoch)[0]
    total = total_steps(cfg, steps_per_epoch)
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)  # at least one step after the warm-up
    if step < warmup:  # linear warm-up (Goyal et al. 2017)
        return cfg.lr * (WARMUP_START + (1.0 - WARMUP_START) * step / warmup)
    if cfg.schedule == "cosine":  # cosine annealing to 0 without restarts (Loshchilov & Hutter 2017)
        return cfg.lr * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2
    return cfg.lr


def momentum_at(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """SGD's momentum at `step`: cycled against the learning rate under one-cycle, else cfg.momentum."""
    if cfg.schedule == "onecycle" and cfg.optimizer == "sgd" and cfg.momentum > 0:
        return _one_cycle(step, cfg, steps_per_epoch)[1]
    return cfg.momentum


def stages_frozen(cfg: TrainConfig, epoch: int) -> bool:
    """Whether the first `cfg.freeze` trunk stages are frozen in 1-based `epoch`: until `unfreeze_epoch` (0: always)."""
    return cfg.freeze > 0 and not 0 < cfg.unfreeze_epoch <= epoch


def trunk_lr_scale(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """The frozen stages' share of `lr_at(step)`: 0 while frozen, then `cfg.unfreeze_lr_scale`."""
    return 0.0 if stages_frozen(cfg, step // max(1, steps_per_epoch) + 1) else cfg.unfreeze_lr_scale


def set_hyperparameters(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig, steps_per_epoch: int) -> None:
    """Learning rate, momentum and weight decay of `step`, all from cfg (which may change between epochs)."""
    lr, momentum = lr_at(step, cfg, steps_per_epoch), momentum_at(step, cfg, steps_per_epoch)
    trunk_lr = lr * trunk_lr_scale(step, cfg, steps_per_epoch)
    for group in optimizer.param_groups:
        group["lr"] = trunk_lr if group.get("frozen_trunk") else lr
        if "momentum" in group:
            group["momentum"] = momentum
    for group in optimizer.param_groups[::2]:  # groups come in pairs; the second (biases, norms) never decays
        group["weight_decay"] = cfg.weight_decay


def _one_cycle(step: int, cfg: TrainConfig, steps_per_epoch: int) -> tuple[float, float]:
    """Learning rate and momentum of one-cycle (Smith 2018) at `step`; the cycle spans total + 1 steps."""
    total = total_steps(cfg, steps_per_epoch)
    rise = min(ONECYCLE_MAX_RISE, max(cfg.warmup_epochs * steps_per_epoch / total, 1 / total))
    peak = rise * (total + 1) - 1  # fractional; below 0 when the run is too short to rise at all
    start = cfg.lr / ONECYCLE_DIV
    low, high = ONECYCLE_MOMENTUM_LOW, ONECYCLE_MOMENTUM_HIGH
    if step <= peak:
        pct = step / peak
        return _cosine(start, cfg.lr, pct), _cosine(high, low, pct)
    pct = (step - peak) / (total - peak)
    return _cosine(cfg.lr, start / ONECYCLE_FINAL_DIV, pct), _cosine(low, high, pct)


def _cosine(start: float, end: float, pct: float) -> float:
    """From `start` (pct 0) to `end` (pct 1) along half a cosine."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
