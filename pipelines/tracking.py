"""MLflow glue: the project's store, experiments, metric names, data hashes, logged models and champions.

The store is `mlflow.tracking_uri` of params.yaml (`sqlite:///mlflow.db`, a relative path taken
from the project root) unless `MLFLOW_TRACKING_URI` is set. Models are logged as MLflow 3
"models from code" (pipelines/mlflow_model.py + the safetensors/JSON folder), never pickled,
registered as `<prefix>-<task>`; the best version of each registered model has the alias `champion`.
"""

from __future__ import annotations

import hashlib
import math
import os
import posixpath
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from pipelines.errors import ConvForgeError
from pipelines.params import MlflowParams

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL_CODE = Path(__file__).resolve().with_name("mlflow_model.py")
CHAMPION = "champion"
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
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or resolve_uri(params.tracking_uri, root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def _retry(action: Callable[[], T], attempts: int = 6) -> T:
    """Retry on SQLite's "database is locked" and the first-start schema-migration race (see PITFALLS)."""
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
    """The id of experiment `name`, created first if needed (before any trial or run writes to it)."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()

    def get_or_create() -> str:
        found = client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                client.restore_experiment(found.experiment_id)
            return found.experiment_id
        return client.create_experiment(name, artifact_location=_artifact_location(mlflow.get_tracking_uri()))

    return _retry(get_or_create)


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


def data_hash(data_dir: Path, root: Path = PROJECT_ROOT) -> str:
    """The DVC md5 of `data_dir` from dvc.lock's augment outs when recorded, else a SHA-256 over its files."""
    import yaml

    data_dir = Path(data_dir)
    lock = root / "dvc.lock"
    if lock.is_file():
        try:
            relative = data_dir.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            relative = None
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for out in stages.get("augment", {}).get("outs", []):
            if relative is not None and out.get("path") == relative and out.get("md5"):
                return str(out["md5"])
    if not data_dir.is_dir():
        raise ConvForgeError(f"{data_dir}: prepared data not found (run `dvc repro augment` first)")
    from pipelines.runtime import sha256_file

    digest = hashlib.sha256()
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(data_dir).as_posix()}:{sha256_file(path)}\n".encode())
    return "sha256:" + digest.hexdigest()


def run_exists(run_id: str) -> bool:
    """Whether the current store has run `run_id`."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().get_run(run_id)
        return True
    except MlflowException:
        return False


def system_metrics_available() -> bool:
    """MLflow's system metrics need psutil (GPU metrics also need pynvml, optional)."""
    try:
        import psutil

        psutil.cpu_percent()
        return True
    except Exception:
        return False


def log_metrics(metrics: Mapping[str, float], step: int | None = None, run_id: str | None = None) -> None:
    """Log finite numeric metrics with sanitized names to `run_id` (default: the active run)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    values = {sanitize(k): float(v) for k, v in metrics.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    if not values:
        return
    if run_id is None:
        mlflow.log_metrics(values, step=step)
        return
    now = int(time.time() * 1000)
    entries = [Metric(k, v, now, step or 0) for k, v in values.items()]
    for start in range(0, len(entries), 1000):  # MLflow's batch limit
        MlflowClient().log_batch(run_id, metrics=entries[start:start + 1000])


def log_params(values: Mapping[str, Any]) -> None:
    """Log a nested mapping of params, flattened, sanitized, in batches of 100 (MLflow's limit)."""
    import mlflow

    flat = {sanitize(k): ("" if v is None else str(v))[:6000] for k, v in flatten(values).items()}
    items = list(flat.items())
    for start in range(0, len(items), 100):
        mlflow.log_params(dict(items[start:start + 100]))


def log_dataset(images: Any, labels: Any | None, name: str, source: str, digest: str, context: str) -> None:
    """Record the data a run used as an MLflow input (schema, size, DVC hash as digest); not the data itself."""
    import mlflow
    import numpy as np

    features = np.asarray(images)
    targets = None if labels is None else np.asarray(labels)
    with warnings.catch_warnings():  # MLflow registers the local-path source twice and warns about it
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_numpy(features, source=source, targets=targets, name=name, digest=digest[:36])
    mlflow.log_input(dataset, context=context, tags={"data_hash": digest})


def model_signature(example: Any, output: Any) -> Any:
    """The pyfunc signature from an input example and its output."""
    from mlflow.models import infer_signature

    return infer_signature(example, output)


def pip_requirements() -> list[str]:
    """Pinned requirements of the pyfunc (given, so MLflow does not spawn a process to infer them)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "torchvision", "safetensors", "numpy", "pandas", "mlflow")]


def log_model(model_dir: Path, example: Any, output: Any, registered_name: str | None) -> Any:
    """Log `model_dir` (safetensors + config.json) as a models-from-code pyfunc; returns the ModelVersion or None."""
    import mlflow

    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(MODEL_CODE), artifacts={"model_dir": str(model_dir)},
        signature=model_signature(example, output), input_example=example, pip_requirements=pip_requirements(),
        registered_model_name=registered_name)
    if registered_name is None:
        return None
    from mlflow import MlflowClient

    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{registered_name}' and run_id = '{info.run_id}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def promote(name: str, version: str, metric: str, score: float, data_digest: str) -> bool:
    """Tag the version with its score; make it the `champion` if it beats the current one.

    A champion trained on other data (another hash) is not comparable: the new version replaces it.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    for key, value in (("metric", metric), ("score", f"{score:.10g}"), ("data_hash", data_digest)):
        client.set_model_version_tag(name, version, key, value)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if champion is not None and champion.version != version:
        tags = champion.tags or {}
        same_data = tags.get("data_hash") == data_digest and tags.get("metric") == metric
        try:
            best = float(tags.get("score", "-inf"))
        except ValueError:
            best = -math.inf
        if same_data and best > score:
            return False
    client.set_registered_model_alias(name, CHAMPION, version)
    return True
