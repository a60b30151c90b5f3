"""Logged models and the model registry: models from code, registered as `<prefix>-<task>`, and champions.

A model is logged as the pyfunc of mlflow_model.py (this folder) with the trained model's folder
(safetensors + config.json) as its artifact, never pickled. The version that passed the promote
stage's gate on test data (pipelines/promotion.py) carries the alias `champion`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any, Mapping

import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from torch import nn

from pipelines.engine import EngineSettings, predict
from pipelines.errors import ConvForgeError
from pipelines.tracking import tags
from pipelines.tracking.outputs import pyfunc_output
from pipelines.tracking.runs import METRICS_PER_BATCH, set_tags, tree_tags
from pipelines.tracking.store import client

MLMODEL = "MLmodel"
MODEL_CODE = Path(__file__).resolve().with_name("mlflow_model.py")
PYFUNC_PACKAGES = ("torch", "torchvision", "safetensors", "numpy", "pandas", "mlflow")
EXAMPLE_IMAGES = 2
SELECTED_PREFIX = "best_"  # the train stage's metrics of the selected epoch (pipelines/training.py `record`)


@dataclass(frozen=True)
class Registration:
    """A registered model version."""

    name: str
    version: int


@dataclass(frozen=True)
class RegisteredVersion:
    """A registered version as the promote stage reads it: its run and its tags."""

    name: str
    version: int
    run_id: str | None
    tags: dict[str, str]

    def number(self, key: str) -> float | None:
        """The tag `key` as a number (a test metric), None when absent or not a number."""
        try:
            return float(self.tags[key])
        except (KeyError, ValueError):
            return None

    def test_metrics(self) -> dict[str, float]:
        """The `test_*` metrics the promote stage recorded on this version."""
        found = {key: self.number(key) for key in self.tags if key.startswith(tags.TEST_METRIC_PREFIX)}
        return {key: value for key, value in found.items() if value is not None}


def registered_name(prefix: str, task: str) -> str:
    """The registered model of `task`."""
    return f"{prefix}-{task}"


def pip_requirements() -> list[str]:
    """Pinned requirements of the pyfunc (given, so MLflow does not spawn a process to infer them)."""
    return [f"{name}=={installed_version(name)}" for name in PYFUNC_PACKAGES]


def pyfunc_example(model: nn.Module, task: str, data: Any) -> tuple[Any, Any]:
    """An input example from `data` (uint8 images) and what the pyfunc returns for it."""
    images = data.images[:EXAMPLE_IMAGES]
    predictions = predict(model, task, images, data.mean, data.std,
                          EngineSettings(device="cpu", amp="off", channels_last=False))
    return images.numpy(), pyfunc_output(predictions, list(data.classes))


@dataclass(frozen=True)
class ModelCard:
    """What a trained model says about itself in MLflow: task, family, data, validation score, weights hash,
    and the epoch it is the checkpoint of."""

    task: str
    family: str
    metric: str
    score: float
    data_hash: str
    weights_sha256: str
    epoch: int = 0

    @property
    def model_name(self) -> str:
        """The logged model's name: its task and family (`classify-resnet`)."""
        return f"{self.task}-{self.family}"

    def description(self) -> str:
        """The version's description, first paragraph: task, family, data, validation score."""
        return (f"{self.task} model, family {self.family}, trained on data {self.data_hash[:16]}; "
                f"validation {self.metric} {self.score:.4f}")


@dataclass(frozen=True)
class LoggedVersion:
    """A logged model (its MLflow model id) and the registered version it became, if registered."""

    model_id: str
    version: str | None


def log_model(model_dir: Path, example: Any, output: Any, name: str | None, model_name: str = "model",
              params: Mapping[str, Any] | None = None, step: int = 0) -> LoggedVersion:
    """Log `model_dir` into the active run as a models-from-code pyfunc called `model_name` (with `params`),
    registered as `name` when given. MLflow links the run's metrics of `step` to it."""
    info = mlflow.pyfunc.log_model(
        name=model_name, python_model=str(MODEL_CODE), artifacts={"model_dir": str(model_dir)},
        signature=infer_signature(example, output), input_example=example, pip_requirements=pip_requirements(),
        registered_model_name=name, params={k: str(v) for k, v in (params or {}).items()} or None, step=step)
    if name is None:
        return LoggedVersion(info.model_id, None)
    versions = client().search_model_versions(f"name = '{name}' and run_id = '{info.run_id}'")
    return LoggedVersion(info.model_id, max((v.version for v in versions), key=int) if versions else None)


def link_metrics(run_id: str, model_id: str, prefix: str) -> None:
    """The run's metrics named `prefix...` (not the `per_class/` sections) as the logged model's metrics too, the
    Models tab's columns. Each is logged again as it was (same time and step), which MLflow keeps as one point."""
    store = client()
    keys = [key for key in store.get_run(run_id).data.metrics if key.startswith(prefix) and "/" not in key]
    latest = [max(store.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step)) for key in keys]
    entries = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id) for m in latest]
    for start in range(0, len(entries), METRICS_PER_BATCH):
        store.log_batch(run_id, metrics=entries[start:start + METRICS_PER_BATCH])


def registered_description(task: str) -> str:
    """The registered model's description (the same for every version)."""
    return (f"ConvForge's {task} models: each `dvc repro train@{task}` registers a version, described by its "
            f"family, data, validation and test metrics. The alias `{tags.CHAMPION_ALIAS}` marks the version "
            f"that passed the promote stage's gate on test data; it is the one served.")


def register_model(model_dir: Path, model: nn.Module, data: Any, name: str, card: ModelCard) -> Registration:
    """Log the saved model of the active run with its metrics (its epoch's, and the run's `best_*` but not
    their `per_class/` sections), and register it as `name`, tagged with its validation score, data hash,
    weights hash and the tree's tags (uncommitted changes, DVC experiment). Whether it becomes the champion is
    the promote stage's call, on test data."""
    example, output = pyfunc_example(model, card.task, data)
    # At its epoch's step, so MLflow links that epoch's metrics (not the step-0 per-class values) to the model.
    logged = log_model(model_dir, example, output, name, card.model_name,
                       {"task": card.task, "family": card.family, "metric": card.metric, "data_hash": card.data_hash},
                       step=card.epoch)
    link_metrics(mlflow.active_run().info.run_id, logged.model_id, SELECTED_PREFIX)
    version = logged.version
    tag_version(name, version, {tags.VERSION_METRIC: card.metric, tags.VERSION_SCORE: f"{card.score:.10g}",
                                tags.VERSION_DATA_HASH: card.data_hash,
                                tags.VERSION_WEIGHTS_SHA256: card.weights_sha256, **tree_tags()})
    store = client()
    store.update_model_version(name, str(version), description=card.description())
    store.update_registered_model(name, description=registered_description(card.task))
    set_tags({tags.REGISTERED_VERSION: version})
    return Registration(name, int(version))


def scores_on_test(values: Mapping[str, Any]) -> str:
    """The `test_*` numbers of `values` as one line of a version's description."""
    found = {key.removeprefix(tags.TEST_METRIC_PREFIX): value for key, value in values.items()
             if key.startswith(tags.TEST_METRIC_PREFIX) and isinstance(value, (int, float))}
    return ("test: " + ", ".join(f"{key} {value:.4f}" for key, value in found.items())) if found else ""


def tag_version(name: str, version: int | str, values: Mapping[str, Any], description: str | None = None) -> None:
    """Tags (as strings) on a registered version; with `description`, the version's description becomes its
    card (the first paragraph, written at registration), the `test_*` numbers of `values`, and `description`."""
    store = client()
    for key, value in values.items():
        store.set_model_version_tag(name, str(version), key, str(value))
    if description is not None:
        card = (store.get_model_version(name, str(version)).description or "").split("\n\n")[0]
        paragraphs = (card, scores_on_test(values), description)
        store.update_model_version(name, str(version), description="\n\n".join(p for p in paragraphs if p))


def model_version(name: str, version: int | str) -> RegisteredVersion:
    """Registered version `version` of `name`."""
    try:
        found = client().get_model_version(name, str(version))
    except MlflowException as exc:
        raise ConvForgeError(f"registered model {name} v{version} not found in the MLflow store "
                             f"{mlflow.get_registry_uri()} ({exc.error_code})") from None
    return RegisteredVersion(name, int(found.version), found.run_id, dict(found.tags or {}))


def champion(name: str) -> RegisteredVersion | None:
    """The version of `name` that holds the `champion` alias, None when there is none yet."""
    try:
        found = client().get_model_version_by_alias(name, tags.CHAMPION_ALIAS)
    except MlflowException as exc:  # no such registered model, or no such alias
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return RegisteredVersion(name, int(found.version), found.run_id, dict(found.tags or {}))


def set_champion(name: str, version: int | str) -> None:
    """Move the `champion` alias of `name` to `version`."""
    client().set_registered_model_alias(name, tags.CHAMPION_ALIAS, str(version))


def model_folder(mlmodel: Path, what: str) -> str:
    """Where a logged model keeps its ConvForge model folder (safetensors + config.json), relative to the
    logged model, as its MLmodel file names it; `what` names the model in the error."""
    flavor = Model.load(str(mlmodel)).flavors.get("python_function", {})
    relative = flavor.get("artifacts", {}).get("model_dir", {}).get("path")
    if not relative:
        raise ConvForgeError(f"{what} holds no ConvForge model folder")
    return relative


def download_model_dir(name: str, version: int | str, dest: Path) -> Path:
    """The model folder (safetensors + config.json) that version `version` of `name` logged, downloaded under
    `dest`; returns its path."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dest)))
    folder = local / model_folder(local / MLMODEL, f"registered model {name} v{version}")
    if not folder.is_dir():
        raise ConvForgeError(f"registered model {name} v{version} holds no ConvForge model folder")
    return folder
