"""The optimizer and the per-step schedule: `lr_at`/`momentum_at` equal torch's schedulers at every step."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn

from pipelines.optim import lr_at, make_optimizer, momentum_at, set_hyperparameters, total_steps


@pytest.fixture(scope="module")
def cfg(project_params):
    return project_params.train.classify.updated(lr=0.05, momentum=0.9, weight_decay=5e-4)


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


def torch_scheduler(optimizer, cfg, steps_per_epoch):
    """The engine's schedule as torch's schedulers composed it before `lr_at`: the reference."""
    from torch.optim import lr_scheduler as sched

    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        warm = min(0.3, max(cfg.warmup_epochs * steps_per_epoch / total, 1 / total))
        return sched.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total + 1, pct_start=warm,
                                cycle_momentum=cfg.optimizer == "sgd" and cfg.momentum > 0)
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
    main = (sched.CosineAnnealingLR(optimizer, T_max=total - warmup) if cfg.schedule == "cosine"
            else sched.ConstantLR(optimizer, factor=1.0, total_iters=0))
    if warmup <= 0:
        return main
    return sched.SequentialLR(optimizer, [sched.LinearLR(optimizer, 0.01, 1.0, total_iters=warmup), main],
                              milestones=[warmup])


CASES = list(itertools.product(
    ["cosine", "onecycle", "constant"],
    [0, 1, 3, 50],  # warm-up epochs: none, one, several, more than the run
    [(1, 1), (1, 6), (3, 4), (2, 7), (6, 1)],  # (epochs, steps per epoch)
    [("sgd", 0.9), ("sgd", 0.0), ("adamw", 0.9)],
))


@pytest.mark.parametrize("schedule,warmup,shape,optimizer", CASES)
def test_lr_and_momentum_equal_torch_schedulers_at_every_step(cfg, schedule, warmup, shape, optimizer):
    (epochs, steps), (name, momentum) = shape, optimizer
    run = cfg.updated(schedule=schedule, warmup_epochs=warmup, epochs=epochs, optimizer=name, momentum=momentum)
    reference = make_optimizer(tiny_model(), run)
    scheduler = torch_scheduler(reference, run, steps)
    ours = make_optimizer(tiny_model(), run)
    for step in range(total_steps(run, steps) + 1):
        set_hyperparameters(ours, step, run, steps)
        for theirs, mine in zip(reference.param_groups, ours.param_groups):
            assert mine["lr"] == pytest.approx(theirs["lr"], rel=0, abs=1e-9), step
            assert ("momentum" in mine) == ("momentum" in theirs) and mine.get("betas") == theirs.get("betas")
            if "momentum" in theirs:
                assert mine["momentum"] == pytest.approx(theirs["momentum"], rel=0, abs=1e-9), step
            assert mine["weight_decay"] == theirs["weight_decay"]
        assert lr_at(step, run, steps) == ours.param_groups[0]["lr"]
        reference.step()  # no gradients: a no-op that keeps the scheduler's order check quiet
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()


def test_warmup_then_cosine_and_no_decay_on_biases(cfg):
    optimizer = make_optimizer(tiny_model(), cfg)
    assert optimizer.defaults["nesterov"] and [g["weight_decay"] for g in optimizer.param_groups] == [
        cfg.weight_decay, 0.0]
    assert all(p.ndim <= 1 for p in optimizer.param_groups[1]["params"])
    steps, run = 10, cfg.updated(epochs=3, warmup_epochs=1, schedule="cosine")
    lrs = [lr_at(step, run, steps) for step in range(3 * steps)]
    assert lrs[0] == pytest.approx(cfg.lr * 0.01) and lrs[steps] == pytest.approx(cfg.lr)
    assert all(a <= b for a, b in zip(lrs[:steps], lrs[1:steps + 1]))
    assert all(a >= b for a, b in zip(lrs[steps:], lrs[steps + 1:])) and lrs[-1] < 0.01 * cfg.lr


def test_one_cycle_momentum_mirrors_the_learning_rate(cfg):
    run, steps = cfg.updated(schedule="onecycle", epochs=4, warmup_epochs=1, optimizer="sgd"), 5
    lrs = [lr_at(step, run, steps) for step in range(total_steps(run, steps) + 1)]
    momenta = [momentum_at(step, run, steps) for step in range(total_steps(run, steps) + 1)]
    peak = lrs.index(max(lrs))
    assert momenta.index(min(momenta)) == peak and momenta[0] == pytest.approx(0.95)
    assert momentum_at(3, run.updated(optimizer="adamw"), steps) == run.momentum


def test_a_changed_config_takes_effect_on_an_optimizer_restored_from_a_state_dict(cfg):
    model = tiny_model()
    before = make_optimizer(model, cfg)
    changed = cfg.updated(lr=0.2, weight_decay=1e-3, momentum=0.5, schedule="constant", warmup_epochs=0)
    after = make_optimizer(model, changed)
    after.load_state_dict(before.state_dict())  # a checkpoint's values for lr, momentum, weight decay
    set_hyperparameters(after, 7, changed, 4)
    assert [g["lr"] for g in after.param_groups] == [0.2, 0.2]
    assert [g["momentum"] for g in after.param_groups] == [0.5, 0.5]
    assert [g["weight_decay"] for g in after.param_groups] == [1e-3, 0.0]
