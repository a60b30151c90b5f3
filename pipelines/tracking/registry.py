"""Logged models and the model registry: models from code, registered as `<prefix>-<task>`, and champions.

A model is logged as the pyfunc of mlflow_model.py (this folder) with the trained model's folder
(safetensors + config.json) as its artifact, never pickled. The best version of each registered
model carries the alias `champion`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from torch import nn

from pipelines.engine import EngineSettings, predict
from pipelines.tracking import tags
from pipelines.tracking.outputs import pyfunc_output
from pipelines.tracking.runs import set_tags
from pipelines.tracking.store import client

MODEL_CODE = Path(__file__).resolve().with_name("mlflow_model.py")
PYFUNC_PACKAGES = ("torch", "torchvision", "safetensors", "numpy", "pandas", "mlflow")
EXAMPLE_IMAGES = 2


@dataclass(frozen=True)
class Registration:
    """A registered model version, and whether it became the champion."""

    name: str
    version: int
    champion: bool


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


def log_model(model_dir: Path, example: Any, output: Any, name: str | None) -> str | None:
    """Log `model_dir` into the active run as a models-from-code pyfunc, registered as `name` when given;
    returns the registered version, or None."""
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(MODEL_CODE), artifacts={"model_dir": str(model_dir)},
        signature=infer_signature(example, output), input_example=example, pip_requirements=pip_requirements(),
        registered_model_name=name)
    if name is None:
        return None
    versions = client().search_model_versions(f"name = '{name}' and run_id = '{info.run_id}'")
    return max((v.version for v in versions), key=int) if versions else None


def promote(name: str, version: str, metric: str, score: float, data_digest: str) -> bool:
    """Tag the version with its score; make it the `champion` if it beats the current one.

    A champion trained on other data (another hash) is not comparable: the new version replaces it.
    """
    store = client()
    for key, value in ((tags.VERSION_METRIC, metric), (tags.VERSION_SCORE, f"{score:.10g}"),
                       (tags.VERSION_DATA_HASH, data_digest)):
        store.set_model_version_tag(name, version, key, value)
    try:
        champion = store.get_model_version_by_alias(name, tags.CHAMPION_ALIAS)
    except MlflowException:
        champion = None
    if champion is not None and champion.version != version:
        found = champion.tags or {}
        same_data = found.get(tags.VERSION_DATA_HASH) == data_digest and found.get(tags.VERSION_METRIC) == metric
        try:
            best = float(found.get(tags.VERSION_SCORE, "-inf"))
        except ValueError:
            best = -math.inf
        if same_data and best > score:
            return False
    store.set_registered_model_alias(name, tags.CHAMPION_ALIAS, version)
    return True


def register_model(model_dir: Path, model: nn.Module, task: str, data: Any, name: str, metric: str,
                   score: float, data_digest: str) -> Registration:
    """Log the saved model of the active run, register it as `name`, promote it if it is the best so far."""
    example, output = pyfunc_example(model, task, data)
    version = log_model(model_dir, example, output, name)
    champion = promote(name, version, metric, score, data_digest)
    set_tags({tags.REGISTERED_VERSION: version, tags.CHAMPION: champion})
    return Registration(name, int(version), champion)
