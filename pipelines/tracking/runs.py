"""Runs and what they hold: names MLflow accepts, params, metrics, datasets, artifacts, tags."""

from __future__ import annotations

import math
import os
import posixpath
import re
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
import numpy as np
from mlflow.entities import Metric, Param

from pipelines.tracking import tags
from pipelines.tracking.store import PROJECT_ROOT, client

METRICS_PER_BATCH = 1000  # MLflow's limits on one logging call
PARAMS_PER_BATCH = 100
PARAM_LENGTH = 6000
DVC_EXP_NAME = "DVC_EXP_NAME"  # set by `dvc exp run` (DVC 3.x, dvc.env) in the commands of its stages


def sanitize(name: str) -> str:
    """A metric/param name MLflow accepts: letters, digits, `_-. /` only (`map@.5` -> `map_.5`), no odd paths."""
    clean = re.sub(r"[^\w.\- /]", "_", name)
    if posixpath.normpath(clean) != clean or clean.startswith(("/", ".")):
        clean = clean.replace("/", "_").lstrip(".") or "_"
    return clean


def flatten(values: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested mappings as one level: {"a": {"b": 1}} -> {"a.b": 1}; other values unchanged."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name, sep))
        else:
            out[name] = value
    return out


def param_entries(values: Mapping[str, Any]) -> list[Param]:
    """A nested mapping of params as MLflow params: flattened, sanitized, None as ''."""
    flat = flatten(values)
    return [Param(sanitize(k), ("" if v is None else str(v))[:PARAM_LENGTH]) for k, v in flat.items()]


def metric_entries(metrics: Mapping[str, Any], step: int, timestamp_ms: int | None = None,
                   model_id: str | None = None) -> list[Metric]:
    """The finite numbers of `metrics` as MLflow metrics with sanitized names; with `model_id`, those without a
    `/` in their name (not the `per_class/` sections) are also the logged model's metrics."""
    now = timestamp_ms or int(time.time() * 1000)
    return [Metric(sanitize(k), float(v), now, step, model_id=None if "/" in k else model_id)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]


def log_metrics(metrics: Mapping[str, Any], step: int | None = None, run_id: str | None = None,
                model_id: str | None = None) -> None:
    """Log the finite numbers of `metrics` to `run_id` (default: the active run), and against the logged model
    `model_id` when given (what MLflow's Models tab compares models by)."""
    # Through the client, not mlflow.log_metrics: that links every step-0 metric to the run's models itself.
    entries = metric_entries(metrics, step or 0, model_id=model_id)
    run_id = run_id or mlflow.active_run().info.run_id
    for start in range(0, len(entries), METRICS_PER_BATCH):
        client().log_batch(run_id, metrics=entries[start:start + METRICS_PER_BATCH])


def logged_models(run_id: str) -> list[str]:
    """The ids of the models run `run_id` logged."""
    outputs = client().get_run(run_id).outputs
    return [output.model_id for output in (outputs.model_outputs if outputs else [])]


def log_params(values: Mapping[str, Any], run_id: str | None = None) -> None:
    """Log a nested mapping of params to `run_id` (default: the active run)."""
    entries = param_entries(values)
    run_id = run_id or mlflow.active_run().info.run_id
    for start in range(0, len(entries), PARAMS_PER_BATCH):
        client().log_batch(run_id, params=entries[start:start + PARAMS_PER_BATCH])


def log_dataset(images: Any, targets: Any | None, name: str, source: str, digest: str, context: str) -> None:
    """Record the data the active run used as an MLflow input (schema, size, DVC hash as digest), not the data."""
    features = np.asarray(images)
    target_array = None if targets is None else np.asarray(targets)
    with warnings.catch_warnings():  # MLflow registers the local-path source twice and warns about it
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_numpy(features, source=source, targets=target_array, name=name,
                                         digest=digest[:36])
    mlflow.log_input(dataset, context=context, tags={tags.DATASET_HASH: digest})


def log_artifacts(folder: Path, artifact_path: str) -> None:
    """Every file of `folder` into the active run, under `artifact_path`."""
    mlflow.log_artifacts(str(folder), artifact_path)


def set_tags(values: Mapping[str, Any], run_id: str | None = None) -> None:
    """Tags (as strings) on `run_id` (default: the active run)."""
    if run_id is None:
        mlflow.set_tags({k: str(v) for k, v in values.items()})
        return
    store = client()
    for key, value in values.items():
        store.set_tag(run_id, key, str(value))


def end_run(run_id: str, status: str) -> None:
    """Mark run `run_id` FINISHED, FAILED or KILLED."""
    client().set_terminated(run_id, status)


def system_metrics_available() -> bool:
    """MLflow's system metrics need psutil (GPU metrics also need pynvml, optional)."""
    try:
        import psutil

        psutil.cpu_percent()
        return True
    except Exception:
        return False


def git_commit(root: Path = PROJECT_ROOT) -> str | None:
    """The checked-out commit, or None outside git or before the first commit."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def tree_tags(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """Whether the run's params or code differ from the commit (in git only), and the DVC experiment running now:
    a `dvc exp run` applies its params to the baseline commit without committing them."""
    from pipelines.tracking.lineage import RUN_INPUTS, has_changes  # lineage imports the registry, which imports us

    found = {tags.GIT_DIRTY: str(has_changes(root, RUN_INPUTS)).lower()} if git_commit(root) else {}
    experiment = os.environ.get(DVC_EXP_NAME)
    return {**found, tags.DVC_EXP: experiment} if experiment else found


def source_tags(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """The source and commit tags `mlflow.start_run` gives a run, for runs created through the client, with the
    tree's (`tree_tags`)."""
    found = {tags.SOURCE_NAME: str(Path(sys.argv[0]).resolve()) if sys.argv and sys.argv[0] else "",
             tags.SOURCE_TYPE: "LOCAL", **tree_tags(root)}
    commit = git_commit(root)
    return {**found, tags.GIT_COMMIT: commit} if commit else found


@contextmanager
def training_run(experiment_id: str, resume_run_id: str | None, task: str, family: str) -> Iterator[str]:
    """The active run of a training (run `resume_run_id` again when given), with system metrics; yields its id.
    Ctrl-C or SIGTERM (`pipelines.errors.Terminated` is a KeyboardInterrupt) ends it KILLED, not FAILED: the
    stage resumes it when rerun."""
    # The commit of the project, not of sys.argv[0]'s folder (MLflow's guess, wrong under pytest or a venv script)
    run_tags = {tags.TASK: task, tags.STAGE: "train", tags.FAMILY: family, **source_tags()}
    with mlflow.start_run(run_id=resume_run_id, experiment_id=None if resume_run_id else experiment_id,
                          run_name=f"train-{task}-{family}", tags=run_tags,
                          log_system_metrics=system_metrics_available()) as run:
        try:
            yield run.info.run_id
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")  # the context then leaves the ended run as it is
            raise


def add_to_run(run_id: str, metrics: Mapping[str, Any], artifacts: Mapping[str, Path]) -> None:
    """Add metrics (step 0, also against the model the run logged) and files or folders
    (`{artifact_path: local path}`) to a run that has ended."""
    models = logged_models(run_id)
    log_metrics(metrics, step=0, run_id=run_id, model_id=models[-1] if models else None)
    store = client()
    for artifact_path, local in artifacts.items():
        if Path(local).is_dir():
            store.log_artifacts(run_id, str(local), artifact_path)
        else:
            store.log_artifact(run_id, str(local), artifact_path)
