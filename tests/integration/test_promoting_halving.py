"""ASHA with promotions (`PromotingHalving`) on a real Ray Tune run: trials pause at each rung, the top
1/reduction_factor of a rung resume from their checkpoints, the rest stop once nothing is left to promote.

The trainable is a made-up learning curve (score = quality + 0.01 per epoch) that keeps its scores in its
checkpoint, as the project's trials do, so a resumed trial goes on from the epoch it paused at."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from pipelines.tuner import SCORES, PromotingHalving, promotable

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


def test_the_top_of_each_rung_is_promoted_and_the_rest_stop(tmp_path):
    import ray
    from ray import tune

    from pipelines.tuner import init_ray, make_scheduler

    init_ray(num_cpus=2)
    try:
        scheduler = make_scheduler("asha_promote", EPOCHS, 1, 3, space=None, num_samples=len(QUALITIES))
        assert isinstance(scheduler, PromotingHalving) and scheduler.rung_epochs == [1, 3]
        tuner = tune.Tuner(
            tune.with_resources(curve, {"cpu": 1}), param_space={"quality": tune.grid_search(QUALITIES)},
            tune_config=tune.TuneConfig(metric="score", mode="max", scheduler=scheduler, reuse_actors=True),
            run_config=tune.RunConfig(name="promote", storage_path=str(tmp_path), verbose=0,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        grid = tuner.fit()
    finally:
        ray.shutdown()

    assert grid.num_errors == 0 and len(grid) == len(QUALITIES)
    epochs = {round(r.config["quality"], 1): r.metrics["epoch"] for r in grid}
    # Rung 1 promotes its top 3 of 9 (0.9, 0.8, 0.7), rung 3 its top 1 of those 3; the rest stay where they paused.
    assert epochs == {0.9: 9, 0.8: 3, 0.7: 3, **{q: 1 for q in (0.2, 0.1, 0.4, 0.3, 0.6, 0.5)}}
    assert sum(epochs.values()) == 21  # every trial at full budget: 81
    for result in grid:  # resumed from the checkpoint: no epoch trained twice, none skipped
        quality = result.config["quality"]
        assert result.metrics[SCORES] == pytest.approx([quality + 0.01 * e for e in range(result.metrics["epoch"])])


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
