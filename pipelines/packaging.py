"""Trained models into the BentoML model store, their ONNX exports, and the Bento (the package stage).

Each `artifacts/models/<task>/` becomes BentoML model `convforge-<task>` (files only:
safetensors weights + config.json [+ model.onnx], never a pickled module), labelled with its
MLflow run, registered version, search trial, DVC data hash and git commit, with the test
metrics (reports/metrics/<task>.json) as metadata. The Bento is built from
services/bentofile.yaml and exported as one archive (what the Dockerfile installs) next to
bento.json (tags).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipelines.tasks import TASKS
from models._checkpoint import read_registration
from services.catalog import lineage_from_config, model_name

ROOT = Path(__file__).resolve().parents[1]
BENTOFILE = ROOT / "services" / "bentofile.yaml"
ARCHIVE = "convforge.bento"


def _labels(task: str, config: dict[str, Any], registration: dict[str, Any], sha: str) -> dict[str, str]:
    """BentoML labels are strings: the lineage, with '' for what the train stage did not record."""
    lineage = {**lineage_from_config(config, registration), "weights_sha256": sha}
    return {"task": task, "family": str(config.get("family", "")),
            **{key: "" if value is None else str(value) for key, value in lineage.items()}}


def _existing(task: str, sha: str, with_onnx: bool) -> Any | None:
    """A stored model of `task` with the same weights (re-running package adds no copy)."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        stored = bentoml.models.list(model_name(task))
    except NotFound:
        return None
    for model in stored:
        if model.info.labels.get("weights_sha256") == sha and \
                (Path(model.path) / "model.onnx").is_file() == with_onnx:
            return model
    return None


def import_model(task: str, directory: Path, metrics_path: Path | None, export: bool = True) -> tuple[str, dict]:
    """Store `directory` as `convforge-<task>` (+ ONNX for classify/segment); returns (tag, ONNX report)."""
    import bentoml

    from models import _checkpoint as checkpoint
    from pipelines.errors import ConvForgeError
    from pipelines.export import EXPORTABLE, export_checked
    from pipelines.runtime import sha256_file

    directory = Path(directory)
    weights, config_path = directory / "model.safetensors", directory / "config.json"
    if not weights.is_file() or not config_path.is_file():
        raise ConvForgeError(f"{directory}: no trained model (model.safetensors + config.json); "
                             f"run `dvc repro train@{task}`")
    config = json.loads(config_path.read_text())
    sha = sha256_file(weights)
    recorded = config.get("weights_sha256")
    if recorded and recorded != sha:
        raise ConvForgeError(f"{weights}: sha256 {sha[:12]} differs from config.json's {recorded[:12]}")
    with_onnx = export and task in EXPORTABLE
    found = _existing(task, sha, with_onnx)
    if found is not None:
        print(f"package: {task}: {found.tag} already stored", flush=True)
        return str(found.tag), dict(found.info.metadata.get("onnx") or {})
    module, _ = checkpoint.load(directory, expected_sha256=sha, device="cpu")
    metrics = json.loads(metrics_path.read_text()) if metrics_path and metrics_path.is_file() else {}
    with tempfile.TemporaryDirectory() as scratch:
        report = export_checked(module, config, Path(scratch) / "model.onnx") if with_onnx else {}
        metadata = {"metrics": metrics, "onnx": report, "image_size": config.get("image_size"),
                    "classes": list(config.get("classes", []))}
        with bentoml.models.create(model_name(task), module="convforge", labels=_labels(task, config, read_registration(directory), sha),
                                   metadata=metadata) as model:
            target = Path(model.path)
            shutil.copy2(weights, target / "model.safetensors")
            shutil.copy2(config_path, target / "config.json")
            if report:
                shutil.copy2(Path(scratch) / "model.onnx", target / "model.onnx")
    print(f"package: {task}: stored {model.tag}" + (f" (ONNX max |diff| {report['max_abs_diff']:.2g})"
                                                    if report else ""), flush=True)
    return str(model.tag), report


def build_bento(model_tags: dict[str, str], build_ctx: Path = ROOT) -> str:
    """Build the Bento from services/bentofile.yaml with the packaged models; returns its tag."""
    import bentoml
    import yaml

    options = yaml.safe_load(BENTOFILE.read_text())
    options["models"] = list(model_tags.values())
    service = options.pop("service")
    bento = bentoml.bentos.build(service, build_ctx=str(build_ctx), **options)
    return str(bento.tag)


def package(models_dir: Path, metrics_dir: Path, out_dir: Path, export: bool = True) -> dict[str, Any]:
    """Import every trained task, build and export the Bento; writes `out_dir/bento.json`."""
    import bentoml

    from pipelines.errors import ConvForgeError
    from pipelines.runtime import atomic_dir, write_json

    tags, onnx = {}, {}
    for task in TASKS:
        if (Path(models_dir) / task).exists():
            tags[task], report = import_model(task, Path(models_dir) / task, Path(metrics_dir) / f"{task}.json",
                                              export)
            if report:
                onnx[task] = report
    if not tags:
        raise ConvForgeError(f"{models_dir}: no trained models (expected {', '.join(TASKS)} folders); "
                             "run `dvc repro train` first")
    print("package: building the Bento", flush=True)
    bento_tag = build_bento(tags)
    summary = {"bento": bento_tag, "models": tags, "onnx": onnx, "archive": ARCHIVE,
               "serve": "python -m services.serve"}
    with atomic_dir(Path(out_dir)) as staging:
        bentoml.bentos.export_bento(bento_tag, str(staging / ARCHIVE))
        write_json(staging / "bento.json", summary)
    print(f"package: {bento_tag} -> {Path(out_dir) / ARCHIVE}", flush=True)
    return summary
