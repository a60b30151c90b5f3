"""The Ray Tune callback that logs each trial of a search as an MLflow child run of the search's parent run.

It prints nothing: what a search prints is pipelines/search_progress.py's."""

from __future__ import annotations

from typing import Any

from mlflow import MlflowClient
from mlflow.entities import RunTag
from ray import tune
from ray.tune.experiment import Trial

from pipelines.tracking import tags
from pipelines.tracking.runs import metric_entries, param_entries, source_tags
from pipelines.tracking.search_runs import TRIAL_CHOICE, find_trial_run
from pipelines.tuner import error_line, trial_index

# Ray Tune adds these bookkeeping numbers to every result (the trial's clock, counters, process id). Ray's
# own list of them is no public API, so they are named here: they are no training metrics. `epoch` is the step.
RAY_RESULT_NUMBERS = {"timestamp", "time_this_iter_s", "time_total_s", "time_since_restore", "training_iteration",
                      "iterations_since_restore", "timesteps_total", "timesteps_since_restore", "episodes_total",
                      "pid", "epoch"}


class TrialLogger(tune.Callback):
    """Logs each trial as a child run of `parent_run_id`, from the Tune driver only.

    MLflow on SQLite wants one writer: trials never call MLflow, this callback (in the driver)
    does. It is pickled with the experiment, so a resumed search keeps its parent run. `space`
    turns a trial's config into its choice (`.choice(config)` with `family`, `hparams`, `train`).
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, space: Any,
                 metric: str, max_epochs: int) -> None:
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self.space, self.metric, self.max_epochs = space, metric, max_epochs
        self._runs: dict[str, str] = {}
        self._client: MlflowClient | None = None
        self.source = source_tags()  # the driver's, as its parent run has them

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_runs": {}}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def run_id(self, trial: Trial) -> str:
        """The trial's child run: found by its trial tag (a resumed search), else created with its params."""
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        found = find_trial_run(self.client, self.experiment_id, self.parent_run_id, trial.trial_id)
        if found is None:
            chosen = self.space.choice(trial.config)
            run = self.client.create_run(
                self.experiment_id, run_name=f"{chosen.family}-{trial.trial_id}",
                tags={tags.PARENT_RUN: self.parent_run_id, tags.TRIAL_ID: trial.trial_id, tags.FAMILY: chosen.family,
                      tags.STAGE: "search", **self.source})
            found = run.info.run_id
            index = trial_index(trial)
            values = {"family": chosen.family, "model": chosen.hparams, "train": chosen.train, "trial_index": index}
            self.client.log_batch(found, params=param_entries(values))
            # The choice as it was (params are flattened strings): what a replay rebuilds the trial from.
            self.client.log_dict(found, {"index": index, "family": chosen.family, "hparams": chosen.hparams,
                                         "train": chosen.train}, TRIAL_CHOICE)
        self._runs[trial.trial_id] = found
        return found

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        # RUNNING again: a trial a Ctrl-C stopped was ended KILLED (search_runs.end_open_trials), now it resumes
        self.client.update_run(self.run_id(trial), status="RUNNING")

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        step = int(result.get("epoch") or result.get("training_iteration") or 0)
        values = {key: value for key, value in result.items() if key not in RAY_RESULT_NUMBERS}
        values["epoch_time_s"] = result.get("time_this_iter_s", 0.0)
        metrics = metric_entries(values, step, timestamp_ms=int(1000 * result.get("timestamp", 0)) or 0)
        run_tags = [RunTag(tags.NODE_ID, str(result.get("node_id"))), RunTag(tags.NODE_IP, str(result.get("node_ip"))),
                    RunTag(tags.DEVICE, str(result.get("device")))]
        self.client.log_batch(self.run_id(trial), metrics=metrics, tags=run_tags)

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.client.set_tag(self.run_id(trial), tags.RETRIES, str(trial.num_failures))

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        epochs = int((trial.last_result or {}).get("epoch", 0) or 0)
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, tags.TRIAL_STATE, "completed" if epochs >= self.max_epochs else "stopped")
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, tags.TRIAL_STATE, "error")
        self.client.set_tag(run_id, tags.RETRIES, str(max(0, trial.num_failures - 1)))
        self.client.set_tag(run_id, tags.ERROR, error_line(trial)[:5000])
        self.client.set_terminated(run_id, "FAILED")
