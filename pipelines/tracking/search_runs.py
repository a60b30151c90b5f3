"""A search in MLflow: one parent run per search key, one child run per Ray Tune trial.

Trials never write to MLflow themselves (SQLite wants one writer): the driver does, through
these functions and the trial logger (trial_logger.py in this folder). What replays a trial
(pipelines/replay.py) is recorded as JSON artifacts: the parent's `search_inputs.json` (what every
trial shares: seed, data hash, commit, base config, engine settings) and each child's `trial.json`
(its index and choice), with its outcome as metrics `trial_score` and `trial_epochs`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from mlflow import MlflowClient
from mlflow.entities import RunTag

from pipelines.tracking import tags
from pipelines.tracking.runs import end_run, metric_entries, param_entries, set_tags, source_tags
from pipelines.tracking.store import client

COMPLETE = "complete"
SEARCH_INPUTS = "search_inputs.json"  # on the parent run
TRIAL_CHOICE = "trial.json"  # on each child run


def open_search(experiment_id: str, task: str, key: str, params: Mapping[str, Any]) -> tuple[str, bool]:
    """The parent run of search `key` (the one an earlier attempt opened, else a new one with `params`),
    and whether that search already completed."""
    store = client()
    found = store.search_runs([experiment_id], filter_string=f"tags.`{tags.SEARCH_KEY}` = '{key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        store.update_run(run_id, status="RUNNING")
        return run_id, found[0].data.tags.get(tags.SEARCH_STATE) == COMPLETE
    run = store.create_run(experiment_id, run_name=f"search-{task}",
                           tags={tags.SEARCH_KEY: key, tags.TASK: task, tags.STAGE: "search", **source_tags()})
    store.log_batch(run.info.run_id, params=param_entries(params))
    return run.info.run_id, False


def log_search_inputs(parent_id: str, inputs: Mapping[str, Any]) -> None:
    """What every trial of the search shares, as the parent run's `search_inputs.json` (what a replay reads)."""
    client().log_dict(parent_id, dict(inputs), SEARCH_INPUTS)


def mark_complete(parent_id: str) -> None:
    """Every trial of the search ran: a rerun reads them back instead of searching again."""
    set_tags({tags.SEARCH_STATE: COMPLETE}, parent_id)


def end_search(parent_id: str, status: str) -> None:
    """End the parent run: FINISHED, FAILED or KILLED (a KILLED search resumes when rerun)."""
    end_run(parent_id, status)


def find_trial_run(store: MlflowClient, experiment_id: str, parent_id: str, trial_id: str) -> str | None:
    """The child run of `trial_id` under `parent_id`, if one exists."""
    runs = store.search_runs(
        [experiment_id], max_results=1,
        filter_string=f"tags.`{tags.PARENT_RUN}` = '{parent_id}' and tags.`{tags.TRIAL_ID}` = '{trial_id}'")
    return runs[0].info.run_id if runs else None


def trial_run(experiment_id: str, parent_id: str, trial_id: str) -> str | None:
    """The run id of `trial_id`'s child run, if the search logged one."""
    return find_trial_run(client(), experiment_id, parent_id, trial_id)


def close_trial_runs(experiment_id: str, parent_id: str, outcomes: Mapping[str, Mapping[str, Any]]) -> None:
    """Record each trial's outcome on its child run (`outcomes`: trial id -> {"status", "score", "epochs"}): its
    state tag, and `trial_score`/`trial_epochs` metrics. Child runs still open end with it: trials the time budget
    stopped, and trials a killed driver started after Tune last saved its state (drawn anew: `lost`)."""
    store = client()
    children = store.search_runs([experiment_id], filter_string=f"tags.`{tags.PARENT_RUN}` = '{parent_id}'")
    for run in children:
        outcome = outcomes.get(run.data.tags.get(tags.TRIAL_ID), {"status": "lost"})
        state = outcome["status"]
        values = {"trial_score": outcome.get("score"), "trial_epochs": outcome.get("epochs")}
        store.log_batch(run.info.run_id, metrics=metric_entries(values, step=0),
                        tags=[RunTag(tags.TRIAL_STATE, state)])
        if run.info.status == "RUNNING":
            store.set_terminated(run.info.run_id, "FINISHED" if state in ("completed", "stopped") else "KILLED")


def end_open_trials(parent_id: str, status: str = "KILLED") -> list[str]:
    """End the child runs of search `parent_id` still RUNNING (trials a Ctrl-C or SIGTERM stopped), tagged
    `interrupted`, so an abandoned search keeps none open; a rerun resumes them. Returns their run ids."""
    store = client()
    experiment_id = store.get_run(parent_id).info.experiment_id
    running = store.search_runs([experiment_id], filter_string=f"tags.`{tags.PARENT_RUN}` = '{parent_id}' "
                                                                "and attributes.status = 'RUNNING'")
    for run in running:
        store.set_tag(run.info.run_id, tags.TRIAL_STATE, "interrupted")
        store.set_terminated(run.info.run_id, status)
    return [run.info.run_id for run in running]


def log_search_result(parent_id: str, files: list[Path], table: Mapping[str, list[Any]], totals: Mapping[str, float],
                      winner: Mapping[str, Any]) -> None:
    """The parent run's record of a finished search, then its end: the files written, the families table,
    a few totals, and the winner (`family`, `trial_id`, `run_id`, its child run marked)."""
    store = client()
    store.log_table(parent_id, dict(table), "families_table.json")
    for path in files:
        store.log_artifact(parent_id, str(path))
    store.log_batch(parent_id, metrics=metric_entries(totals, step=0, timestamp_ms=int(time.time() * 1000)))
    set_tags({tags.WINNER_FAMILY: winner["family"], tags.WINNER_TRIAL_ID: winner["trial_id"],
              tags.WINNER_RUN_ID: winner["run_id"] or ""}, parent_id)
    if winner["run_id"]:
        set_tags({tags.WINNER: "true"}, winner["run_id"])
    end_run(parent_id, "FINISHED")
