"""ASHA with promotions and synchronous successive halving (`PromotingHalving`) on real Ray Tune runs: trials
pause at each rung, the top 1/reduction_factor of a rung resume from their checkpoints, the rest stop once
nothing is left to promote (synchronous: once the rung is decided).

The trainable is a made-up learning curve (score = quality + 0.01 per epoch) that keeps its scores in its
checkpoint, as the project's trials do, so a resumed trial goes on from the epoch it paused at."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest

from pipelines.tuner import SCORES, PromotingHalving, promotable, rung_top

EPOCHS = 9
# Trials start in this order, 2 at a time. The first two reach rung 1 alone: ASHA's stopping rule would let the
# first go on, promotions wait for 3 scores. Either of the next two then makes the first promotion.
QUALITIES = [0.2, 0.1, 0.9, 0.8, 0.4, 0.7, 0.3, 0.6, 0.5]


def curve(config: dict) -> None:
    """One epoch per report: its score, and every score so far in the result and the checkpoint."""
    from ray import tune

    restored = tune.get_checkpoint()
    scores = json.loads((Path(restored.path) / "scores.json").read_text()) if restored else []
    while len(scores) < EPOCHS:
        scores.append(config["quality"] + 0.01 * len(scores))
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "scores.json").write_text(json.dumps(scores))
            tune.report({"score": scores[-1], "epoch": len(scores), SCORES: list(scores)},
                        checkpoint=tune.Checkpoint.from_directory(folder))


def curves_tuner(kind: str, qualities: list[float], storage: Path, callbacks: list | None = None) -> Any:
    """A real Tune run of the curves under scheduler `kind`, 2 at a time, started in the order given."""
    from ray import tune

    from pipelines.tuner import make_scheduler

    scheduler = make_scheduler(kind, EPOCHS, 1, 3, space=None, num_samples=len(qualities))
    assert isinstance(scheduler, PromotingHalving) and scheduler.rung_epochs == [1, 3]
    return tune.Tuner(
        tune.with_resources(curve, {"cpu": 1}), param_space={"quality": tune.grid_search(qualities)},
        tune_config=tune.TuneConfig(metric="score", mode="max", scheduler=scheduler, reuse_actors=True),
        run_config=tune.RunConfig(name=kind, storage_path=str(storage), verbose=0, callbacks=callbacks,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


def epochs_trained(grid: Any, qualities: list[float]) -> dict[float, int]:
    """Each curve's epochs, once every curve has ended without error and without an epoch trained twice."""
    assert grid.num_errors == 0 and len(grid) == len(qualities)
    for result in grid:  # resumed from the checkpoint: no epoch trained twice, none skipped
        quality = result.config["quality"]
        assert result.metrics[SCORES] == pytest.approx([quality + 0.01 * e for e in range(result.metrics["epoch"])])
    return {round(r.config["quality"], 1): r.metrics["epoch"] for r in grid}


def run_curves(kind: str, qualities: list[float], storage: Path) -> dict[float, int]:
    """The curves' run under scheduler `kind` on a local Ray of 2 CPUs: each curve's epochs."""
    import ray

    from pipelines.tuner import init_ray

    init_ray(num_cpus=2)
    try:
        grid = curves_tuner(kind, qualities, storage).fit()
    finally:
        ray.shutdown()
    return epochs_trained(grid, qualities)


def test_the_top_of_each_rung_is_promoted_and_the_rest_stop(tmp_path):
    epochs = run_curves("asha_promote", QUALITIES, tmp_path)
    # Rung 1 promotes its top 3 of 9 (0.9, 0.8, 0.7), rung 3 its top 1 of those 3; the rest stay where they paused.
    assert epochs == {0.9: 9, 0.8: 3, 0.7: 3, **{q: 1 for q in (0.2, 0.1, 0.4, 0.3, 0.6, 0.5)}}
    assert sum(epochs.values()) == 21  # every trial at full budget: 81


def test_a_synchronous_rung_waits_for_every_trial_and_keeps_one_at_least():
    sync = PromotingHalving([1, 3], 3, num_samples=4, synchronous=True)
    histories = {"a": [0.5], "b": [0.7], "c": [0.6], "d": []}
    assert not sync.decided(histories, {"a", "b", "c", "d"}, 1)  # d has not reached the rung
    assert not sync.decided({k: v for k, v in histories.items() if k != "d"}, {"a", "b", "c"}, 1)  # 3 of 4 drawn
    histories["d"] = [0.4]
    assert sync.decided(histories, {"a", "b", "c", "d"}, 1)
    assert rung_top(histories, 1, 3, keep_one=True) == ["b"]
    # b runs on to rung 3; a, c and d, left out of rung 1, do not hold rung 3 back; b alone there: it goes on.
    histories["b"] = [0.7, 0.72, 0.74]
    assert sync.left_out(histories, {"a", "b", "c", "d"}, "a") and not sync.left_out(histories, {"b"}, "b")
    assert sync.decided(histories, {"a", "b", "c", "d"}, 3)
    assert promotable(histories, 3, 3, waiting={"b"}, keep_one=True) == ["b"]
    assert promotable(histories, 3, 3, waiting={"b"}) == []  # asynchronous: one score, no promotion yet


def test_promotions_are_the_top_of_the_rung_that_wait_there():
    histories = {"a": [0.5], "b": [0.7], "c": [0.6, 0.65], "d": [0.9, 0.95, 0.97]}
    # Rung 1 holds 4 scores: its top 1 (rf 3) is d, which has moved on already: nothing to promote.
    assert promotable(histories, 1, 3, waiting={"a", "b"}) == []
    # rf 2: top 2 are d and b; b waits at the rung.
    assert promotable(histories, 1, 2, waiting={"a", "b"}) == ["b"]
    assert promotable(histories, 1, 2, waiting={"a"}) == []  # b neither paused nor reporting (running, stopped)
    # Rung 2 holds c and d: top 1 of 2 is d, which is past it.
    assert promotable(histories, 2, 2, waiting={"c"}) == []
    assert promotable({"a": [0.5], "b": [0.7]}, 1, 3, waiting={"a", "b"}) == []  # fewer scores than rf: none yet
    # A NaN score ranks last; ties go to the trial drawn first.
    assert promotable({"x": [float("nan")], "y": [0.1], "z": [0.1]}, 1, 2, waiting={"x", "y", "z"}) == ["y"]


def test_synchronous_halving_decides_each_rung_on_all_its_trials_across_a_restore(tmp_path):
    """0.5 leads the first 3 curves at rung 1, where ASHA's promotions would let it on; synchronous halving waits
    for all 9 and keeps their top 3, then the top 1 of those. The run is interrupted once 5 curves have reported
    and restored: Tune requeues the paused trials as pending, with their checkpoints, and would start them
    itself; none may train on before its rung is decided."""
    import os
    import signal

    import ray
    from ray import tune

    from pipelines.tuner import init_ray

    qualities = [0.5, 0.1, 0.2, 0.9, 0.8, 0.7, 0.4, 0.3, 0.6]  # started in this order, 2 at a time
    interrupted = tmp_path / "interrupted"

    class InterruptOnce(tune.Callback):
        """Stops the run as Ctrl-C would (Tune's SIGUSR1 handler saves the state), at the 5th result, once."""

        def __init__(self):
            self.results = 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.results += 1
            if self.results == 5 and not interrupted.exists():
                interrupted.touch()
                os.kill(os.getpid(), signal.SIGUSR1)

    init_ray(num_cpus=2)
    try:
        first = curves_tuner("sha", qualities, tmp_path, callbacks=[InterruptOnce()]).fit()
        assert interrupted.exists() and sum(r.metrics.get("epoch", 0) for r in first if r.metrics) < len(qualities)
        assert tune.Tuner.can_restore(str(tmp_path / "sha"))
        grid = tune.Tuner.restore(str(tmp_path / "sha"), trainable=tune.with_resources(curve, {"cpu": 1}),
                                  resume_unfinished=True).fit()
    finally:
        ray.shutdown()
    assert epochs_trained(grid, qualities) == {0.9: 9, 0.8: 3, 0.7: 3, **{q: 1 for q in (0.5, 0.1, 0.2, 0.4, 0.3, 0.6)}}
