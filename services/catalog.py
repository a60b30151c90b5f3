"""Which models the service serves, and where their files and lineage come from.

Production: the BentoML model store (the tags `pipelines.stages.package` wrote; inside a Bento,
its own store). Development and tests: `CONVFORGE_MODELS_DIR=artifacts/models` serves
`<dir>/<task>/` (model.safetensors + config.json, registration.json for the registered version)
straight from the train stage's outputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models._checkpoint import read_registration
from pipelines.tasks import TASKS

MODELS_DIR_ENV = "CONVFORGE_MODELS_DIR"
MODEL_TAGS_ENV = "CONVFORGE_MODEL_TAGS"  # JSON {"<task>": "convforge-<task>:<version>", ...}
LINEAGE_KEYS = ("git_commit", "data_hash", "search_trial_id", "mlflow_run_id", "registered_model",
                "registered_version", "registered_alias", "weights_sha256")


@dataclass(frozen=True)
class ModelSource:
    """One task's model files, its name:version and its lineage."""

    task: str
    directory: Path
    name: str
    version: str
    lineage: dict[str, Any] = field(default_factory=dict)
    expected_sha256: str | None = None


def use_project_store(root: Path) -> Path:
    """BENTOML_HOME defaults to `<project>/.bentoml` (gitignored); call before importing bentoml."""
    home = Path(os.environ.setdefault("BENTOML_HOME", str(Path(root) / ".bentoml")))
    home.mkdir(parents=True, exist_ok=True)
    return home


def model_name(task: str) -> str:
    """The BentoML model name of a task's model."""
    return f"convforge-{task}"


def lineage_from_config(config: dict[str, Any], registration: dict[str, Any] | None = None) -> dict[str, Any]:
    """The lineage fields of a model's config.json and registration.json (train stage contract);
    missing ones are None."""
    merged = {**config, **(registration or {})}
    return {key: merged.get(key) for key in LINEAGE_KEYS}


def from_directory(root: Path) -> list[ModelSource]:
    """`root/<task>/config.json` (+ registration.json) for each task present (train stage outputs)."""
    found = []
    for task in TASKS:
        directory = Path(root) / task
        if not (directory / "config.json").is_file():
            continue
        config = json.loads((directory / "config.json").read_text())
        sha = str(config.get("weights_sha256") or "")
        found.append(ModelSource(task, directory, model_name(task), sha[:12] or "dev",
                                 lineage_from_config(config, read_registration(directory)), sha or None))
    return found


def from_store(tags: dict[str, str] | None = None) -> list[ModelSource]:
    """Each task's model in the BentoML model store (`tags`, else `convforge-<task>:latest`)."""
    import bentoml
    from bentoml.exceptions import NotFound

    found = []
    for task in TASKS:
        tag = (tags or {}).get(task, f"{model_name(task)}:latest")
        try:
            model = bentoml.models.get(tag)
        except NotFound:
            continue
        labels = dict(model.info.labels)
        lineage = {**{key: labels.get(key) for key in LINEAGE_KEYS}, **dict(model.info.metadata)}
        found.append(ModelSource(task, Path(model.path), model.tag.name, str(model.tag.version), lineage,
                                 labels.get("weights_sha256")))
    return found


def sources() -> list[ModelSource]:
    """The models to serve, from CONVFORGE_MODELS_DIR when set, else from the BentoML store."""
    root = os.environ.get(MODELS_DIR_ENV)
    if root:
        return from_directory(Path(root))
    tags = json.loads(os.environ[MODEL_TAGS_ENV]) if os.environ.get(MODEL_TAGS_ENV) else None
    return from_store(tags)
