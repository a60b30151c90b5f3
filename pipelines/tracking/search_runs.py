"""A search in MLflow: one parent run per search key, one child run per Ray Tune trial.

Trials never write to MLflow themselves (SQLite wants one writer): the driver does, through
these functions and the trial logger (trial_logger.py in this folder).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from mlflow import MlflowClient

from pipelines.tracking import tags
from pipelines.tracking.runs import end_run, metric_entries, param_entries, set_tags
from pipelines.tracking.store import client

COMPLETE = "complete"


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
                           tags={tags.SEARCH_KEY: key, tags.TASK: task, tags.STAGE: "search"})
    store.log_batch(run.info.run_id, params=param_entries(params))
    return run.info.run_id, False


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


def close_trial_runs(experiment_id: str, parent_id: str, states: Mapping[str, str]) -> None:
    """End the child runs still open with their trial's state (`states`: trial id -> state): trials the time
    budget stopped, and trials a killed driver started after Tune last saved its state (drawn anew: `lost`)."""
    store = client()
    open_runs = store.search_runs([experiment_id], filter_string=f"tags.`{tags.PARENT_RUN}` = '{parent_id}' "
                                                                 "and attributes.status = 'RUNNING'")
    for run in open_runs:
        state = states.get(run.data.tags.get(tags.TRIAL_ID), "lost")
        store.set_tag(run.info.run_id, tags.TRIAL_STATE, state)
        store.set_terminated(run.info.run_id, "FINISHED" if state in ("completed", "stopped") else "KILLED")


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
