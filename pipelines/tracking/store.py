"""The MLflow store: its URI, the experiment, and the retry SQLite needs when several processes start at once.

A relative store path is taken from the main workspace, also when `dvc exp run --temp`/`--queue` runs the
pipeline in a copy of the project under `<workspace>/.dvc/tmp/exps/` (deleted afterwards, with any store in it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.params import MlflowParams
from pipelines.tracking import tags

PROJECT_ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT_COPIES = (".dvc", "tmp", "exps")  # DVC 3.x's folder of the copies it runs temp and queued experiments in
T = TypeVar("T")


def workspace_root(root: Path = PROJECT_ROOT) -> Path:
    """The main workspace of the project at `root`: `root` itself, or the folder holding the `.dvc` of the
    `.dvc/tmp/exps/` copy `root` lies in, so the store and Ray's results outlive the copy. Found from the path:
    DVC_ROOT is set only in the commands DVC starts, and the copy's git repository is its own (no way back)."""
    root = Path(root).resolve()
    for folder in root.parents:
        if folder.parts[-len(EXPERIMENT_COPIES):] == EXPERIMENT_COPIES:
            return folder.parents[len(EXPERIMENT_COPIES) - 1]
    return root


def resolve_uri(uri: str, root: Path = PROJECT_ROOT) -> str:
    """A tracking URI with a relative SQLite or file path made absolute against `root`'s main workspace."""
    base = workspace_root(root)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(base / uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri and not uri.startswith("databricks"):
        return (base / uri).resolve().as_uri()
    return uri


def store_uri(params: MlflowParams, root: Path = PROJECT_ROOT) -> str:
    """The project's store: MLFLOW_TRACKING_URI when set, else params.yaml's `mlflow.tracking_uri`, resolved."""
    return os.environ.get("MLFLOW_TRACKING_URI") or resolve_uri(params.tracking_uri, root)


def configure(params: MlflowParams, root: Path = PROJECT_ROOT) -> str:
    """Point MLflow at the project's store (MLFLOW_TRACKING_URI wins); returns the URI."""
    return use_store(store_uri(params, root))


def store_exists(uri: str) -> bool:
    """Whether a local store (SQLite file, file-store folder) is there already; a remote one counts as there."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).is_file()
    if uri.startswith("file:"):
        return Path(url2pathname(urlparse(uri).path)).is_dir()
    return True


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
