"""What a search prints while it runs: one line per trial result and one progress line per finished trial.

It stands in for Ray Tune's own reporter (its box tables, switched off in pipelines/tuner.py). It runs in
the Tune driver, so each line is printed once, whatever the number of nodes.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from ray import tune
from ray.tune.experiment import Trial

from pipelines.tuner import MODE, error_line

ENDED = ("TERMINATED", "ERROR")


class SearchProgress(tune.Callback):
    """Prints `trial <id> <family> epoch e/E <metric> <score> <state>` for each result, and after each trial
    ends `search <task>: n/N trials done, r running; best ...`. `log` prints a line. `rungs`: the epochs where
    the scheduler pauses a trial until its rung decides (asha_promote, sha); a result there is `at rung`, as the
    trial may wait or go on."""

    def __init__(self, task: str, metric: str, max_epochs: int, num_samples: int,
                 log: Callable[[str], None] = print, rungs: list[int] | None = None) -> None:
        self.task, self.metric, self.max_epochs, self.num_samples, self.log = task, metric, max_epochs, num_samples, log
        self.rungs = rungs or []
        self.started = time.monotonic()
        self.ended: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "log": print}

    def setup(self, **info: Any) -> None:
        self.started = time.monotonic()

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        epoch = int(result.get("epoch") or result.get("training_iteration") or 0)
        state = "done" if epoch >= self.max_epochs else "at rung" if epoch in self.rungs else "running"
        self.log(f"trial {trial.trial_id} {trial.config.get('family', '?'):<12} epoch {epoch}/{self.max_epochs}  "
                 f"{self.metric} {score_text(result.get(self.metric))}  {state}")

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        epochs = int((trial.last_result or {}).get("epoch", 0) or 0)
        self.finished(trials, trial, "completed" if epochs >= self.max_epochs else f"stopped at epoch {epochs}")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.finished(trials, trial, f"failed for good ({error_line(trial)})")

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.log(f"trial {trial.trial_id} {trial.config.get('family', '?')} failed (attempt {trial.num_failures}); "
                 "retrying from its last checkpoint")

    def finished(self, trials: list[Trial], trial: Trial, state: str) -> None:
        """The progress line, once `trial` has ended in `state`."""
        self.ended[trial.trial_id] = state
        done = {t.trial_id for t in trials if t.status in ENDED} | set(self.ended)
        running = sum(1 for t in trials if t.status == "RUNNING" and t.trial_id not in done)
        scored = [(t.last_result[self.metric], t) for t in trials
                  if isinstance((t.last_result or {}).get(self.metric), (int, float))]
        best = ""
        if scored:
            score, leader = (max if MODE == "max" else min)(scored, key=lambda pair: pair[0])
            best = f"; best {self.metric} {score_text(score)} ({leader.config.get('family', '?')} {leader.trial_id})"
        self.log(f"search {self.task}: trial {trial.trial_id} {state}; {len(done)}/{self.num_samples} trials done, "
                 f"{running} running{best}; {time.monotonic() - self.started:.0f} s")


def score_text(score: Any) -> str:
    """A score as printed: four decimals, or `-` when the result has none."""
    return f"{score:.4f}" if isinstance(score, (int, float)) else "-"
