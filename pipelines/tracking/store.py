"""The MLflow store: its URI, the experiment, and the retry SQLite needs when several processes start at once."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.params import MlflowParams
from pipelines.tracking import tags

PROJECT_ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def resolve_uri(uri: str, root: Path = PROJECT_ROOT) -> str:
    """A tracking URI with a relative SQLite or file path made absolute against `root`."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(root / uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri and not uri.startswith("databricks"):
        return (root / uri).resolve().as_uri()
    return uri


def configure(params: MlflowParams, root: Path = PROJECT_ROOT) -> str:
    """Point MLflow at the project's store (MLFLOW_TRACKING_URI wins); returns the URI."""
    return use_store(os.environ.get("MLFLOW_TRACKING_URI") or resolve_uri(params.tracking_uri, root))


def use_store(uri: str) -> str:
    """Track runs and register models in the store at `uri`; returns it."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def tracking_uri() -> str:
    """The store MLflow writes to now."""
    return mlflow.get_tracking_uri()


def client(uri: str | None = None) -> MlflowClient:
    """A client of store `uri` (default: the configured one)."""
    return MlflowClient(uri)


def retry(action: Callable[[], T], attempts: int = 6) -> T:
    """`action()`, retried on SQLite's "database is locked" and the schema-migration race of a new store."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception as exc:  # sqlalchemy's OperationalError arrives wrapped in MlflowException
            text = str(exc).lower()
            transient = "locked" in text or "already exists" in text or "unique constraint" in text
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def _artifact_location(uri: str) -> str | None:
    """For a local SQLite store, artifacts go next to the database (mlartifacts/), not under the CWD."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def ensure_experiment(name: str) -> str:
    """The id of experiment `name`, created first if needed (before any trial or run writes to it), of the kind
    "Model training", so MLflow's UI opens it on its runs and models rather than its GenAI pages."""
    store = client()

    def get_or_create() -> str:
        found = store.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                store.restore_experiment(found.experiment_id)
            if found.tags.get(tags.EXPERIMENT_KIND) is None:  # a store from before the kind was set
                store.set_experiment_tag(found.experiment_id, tags.EXPERIMENT_KIND, tags.MODEL_TRAINING_KIND)
            return found.experiment_id
        return store.create_experiment(name, artifact_location=_artifact_location(tracking_uri()),
                                       tags={tags.EXPERIMENT_KIND: tags.MODEL_TRAINING_KIND})

    return retry(get_or_create)


def run_exists(run_id: str) -> bool:
    """Whether the current store has run `run_id`."""
    try:
        client().get_run(run_id)
        return True
    except MlflowException:
        return False
