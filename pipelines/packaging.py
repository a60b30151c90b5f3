"""Trained models into the BentoML model store, their ONNX exports, and the Bento (the package stage).

Each task's champion, `artifacts/champion/<task>/` (the promote stage's choice; its weights checked
against the hash in reports/promotion/<task>.json), becomes BentoML model `convforge-<task>` (files
only: safetensors weights + config.json [+ model.onnx], never a pickled module), labelled with its
MLflow run, registered version and alias, search trial, DVC data hash and git commit, with the
champion's test metrics as metadata, and with the backend it is served on and why
(`backend` label and metadata, `backend_reason` metadata: `serve.backend`, and for `auto`
bench/serve.py's committed figures, services/backends.py). The Bento is built from
services/bentofile.yaml and exported as one archive (what the Dockerfile installs) next to
bento.json (tags, ONNX checks, backends).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from models._checkpoint import read_registration
from pipelines.params import ServeParams, load_params
from pipelines.tasks import TASKS
from services.backends import FIGURES, choose, read_figures
from services.catalog import lineage_from_config, model_name
from services.endpoints import endpoint

ROOT = Path(__file__).resolve().parents[1]
BENTOFILE = ROOT / "services" / "bentofile.yaml"
ARCHIVE = "convforge.bento"


def _labels(task: str, config: dict[str, Any], registration: dict[str, Any], sha: str) -> dict[str, str]:
    """BentoML labels are strings: the lineage, with '' for what the train stage did not record."""
    lineage = {**lineage_from_config(config, registration), "weights_sha256": sha}
    return {"task": task, "family": str(config.get("family", "")),
            **{key: "" if value is None else str(value) for key, value in lineage.items()}}


def _existing(task: str, sha: str, with_onnx: bool, choice: tuple[str, str],
              registration: dict[str, Any]) -> Any | None:
    """A stored model of `task` with the same weights, registration and backend choice (re-running package
    adds no copy; a model stored before its version became the champion is stored again, with its alias)."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        stored = bentoml.models.list(model_name(task))
    except NotFound:
        return None
    for model in stored:
        if model.info.labels.get("weights_sha256") == sha and \
                (Path(model.path) / "model.onnx").is_file() == with_onnx and \
                (model.info.metadata.get("backend"), model.info.metadata.get("backend_reason")) == choice and \
                all(model.info.labels.get(key, "") == ("" if value is None else str(value))
                    for key, value in registration.items()):
            return model
    return None


def import_model(task: str, directory: Path, champion: dict[str, Any] | None = None, export: bool = True,
                 backend_of: Callable[[str, bool], tuple[str, str]] | None = None) -> tuple[str, dict, tuple[str, str]]:
    """Store `directory` as `convforge-<task>` (+ ONNX for the exportable tasks); `backend_of(task, has_onnx)`
    gives its (backend, reason) (`serving_choice`; default torch). `champion`: the promotion report's
    champion (its registered version, weights hash and test metrics), checked against the files.
    Returns (tag, ONNX report, choice)."""
    import bentoml

    from models import _checkpoint as checkpoint
    from pipelines.errors import ConvForgeError
    from pipelines.export import EXPORTABLE, export_checked
    from pipelines.runtime import sha256_file

    directory = Path(directory)
    weights, config_path = directory / "model.safetensors", directory / "config.json"
    if not weights.is_file() or not config_path.is_file():
        raise ConvForgeError(f"{directory}: no champion model (model.safetensors + config.json); "
                             f"run `dvc repro promote@{task}`")
    config = json.loads(config_path.read_text())
    sha = sha256_file(weights)
    recorded = config.get("weights_sha256")
    if recorded and recorded != sha:
        raise ConvForgeError(f"{weights}: sha256 {sha[:12]} differs from config.json's {recorded[:12]}")
    if champion is not None and champion.get("weights_sha256") != sha:
        raise ConvForgeError(f"{weights}: sha256 {sha[:12]} differs from the registry's champion "
                             f"v{champion.get('version')}; rerun `dvc repro promote@{task}`")
    with_onnx = export and task in EXPORTABLE
    choice = backend_of(task, with_onnx) if backend_of else ("torch", "serve.backend: torch")
    registration = read_registration(directory)
    found = _existing(task, sha, with_onnx, choice, registration)
    if found is not None:
        print(f"package: {task}: {found.tag} already stored ({choice[0]}: {choice[1]})", flush=True)
        return str(found.tag), dict(found.info.metadata.get("onnx") or {}), choice
    module, _ = checkpoint.load(directory, expected_sha256=sha, device="cpu")
    metrics = dict((champion or {}).get("metrics") or {})  # the champion's own test metrics
    with tempfile.TemporaryDirectory() as scratch:
        report = export_checked(module, config, Path(scratch) / "model.onnx") if with_onnx else {}
        metadata = {"metrics": metrics, "onnx": report, "image_size": config.get("image_size"),
                    "classes": list(config.get("classes", [])), "backend": choice[0], "backend_reason": choice[1]}
        labels = {**_labels(task, config, registration, sha), "backend": choice[0]}
        with bentoml.models.create(model_name(task), module="convforge", labels=labels, metadata=metadata) as model:
            target = Path(model.path)
            shutil.copy2(weights, target / "model.safetensors")
            shutil.copy2(config_path, target / "config.json")
            if report:
                shutil.copy2(Path(scratch) / "model.onnx", target / "model.onnx")
    print(f"package: {task}: stored {model.tag}" + (f" (ONNX max |diff| {report['max_abs_diff']:.2g})"
                                                    if report else "") + f", {choice[0]}: {choice[1]}", flush=True)
    return str(model.tag), report, choice


def build_bento(model_tags: dict[str, str], build_ctx: Path = ROOT) -> str:
    """Build the Bento from services/bentofile.yaml with the packaged models; returns its tag."""
    import bentoml
    import yaml

    options = yaml.safe_load(BENTOFILE.read_text())
    options["models"] = list(model_tags.values())
    service = options.pop("service")
    bento = bentoml.bentos.build(service, build_ctx=str(build_ctx), **options)
    return str(bento.tag)


def serving_choice(serve: ServeParams, figures: Path = FIGURES) -> Callable[[str, bool], tuple[str, str]]:
    """`backend_of(task, has_onnx)` under `serve` (serve.backend, serve.scale) and bench/serve.py's committed
    figures: the packaged model's backend, decided from files only (the stage stays deterministic)."""
    found = read_figures(figures) if serve.backend == "auto" else None
    return lambda task, has_onnx: choose(task, serve.backend, has_onnx, serve.scale != "native", found)


def champion_of(task: str, promotion_dir: Path) -> dict[str, Any] | None:
    """The champion recorded by `promote@task` (reports/promotion/<task>.json); None when the task has no
    promotion report. A gate that no version has passed yet stops here, naming its failed checks."""
    from pipelines.errors import ConvForgeError

    path = Path(promotion_dir) / f"{task}.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    if report.get("champion") is None:
        raise ConvForgeError(f"{task}: nothing to package: {report['registered_model']} "
                             f"v{report['candidate']['version']} failed the promotion gate "
                             f"({', '.join(report['failed'])}) and no earlier version passed it; see {path}")
    return report["champion"]


NATIVE_SCALES = (0.5, 2.0)  # serve.scale native: the training scale of photos past which objects no longer match


def native_scale_warning(task: str, config: dict[str, Any]) -> str | None:
    """Why `serve.scale: native` would serve `task`'s model at another scale than it trained at, or None: own photos
    letterboxed to the training canvas far from their own size (12 MP photos on a 640 px canvas: 0.16x) reach the
    model at their own pixels, their objects several times the size it learned them at."""
    source = config.get("source_size")
    if not source or not endpoint(task).scalable:  # native applies to the scalable tasks only (detect, segment)
        return None
    size = config["image_size"]
    canvas = max(size) if isinstance(size, (list, tuple)) else int(size)
    aspect = float(source["aspect"])
    longer = float(source["side"]) * max(aspect, 1.0 / aspect) ** 0.5  # side = sqrt(width x height)
    scale = canvas / longer
    if NATIVE_SCALES[0] <= scale <= NATIVE_SCALES[1]:
        return None
    return (f"{task}: serve.scale native serves uploads at their own pixels, but the model trained on its photos "
            f"at about {scale:.2g}x (their longer side ~{longer:.0f} px on a {canvas} px canvas): objects would reach "
            f"it {max(scale, 1 / scale):.1f}x {'smaller' if scale > 1 else 'larger'} than it learned them; "
            "serve.scale fit serves them as trained")


def package(models_dir: Path, promotion_dir: Path, out_dir: Path, export: bool = True,
            serve: ServeParams | None = None) -> dict[str, Any]:
    """Import every task's champion (`models_dir/<task>`, written by the promote stage, with its report in
    `promotion_dir`), build and export the Bento; writes `out_dir/bento.json`.
    `serve`: params.yaml's serve section (its backend and scale decide each model's backend)."""
    import bentoml

    from pipelines.errors import ConvForgeError
    from pipelines.runtime import atomic_dir, write_json

    serve = serve or load_params(ROOT / "params.yaml").serve
    choice = serving_choice(serve)
    tags, onnx, backends = {}, {}, {}
    for task in TASKS:
        if (Path(models_dir) / task).exists():
            tags[task], report, (backend, reason) = import_model(
                task, Path(models_dir) / task, champion_of(task, promotion_dir), export, choice)
            config = json.loads((Path(models_dir) / task / "config.json").read_text())  # import_model checked it
            warning = native_scale_warning(task, config) if serve.scale == "native" else None
            if warning:
                print(f"package: warning: {warning}", flush=True)
            backends[task] = {"backend": backend, "reason": reason}
            if report:
                onnx[task] = report
    if not tags:
        raise ConvForgeError(f"{models_dir}: no champion models (expected {', '.join(TASKS)} folders); "
                             "run `dvc repro promote` first")
    print("package: building the Bento", flush=True)
    bento_tag = build_bento(tags)
    summary = {"bento": bento_tag, "models": tags, "onnx": onnx, "backends": backends, "archive": ARCHIVE,
               "serve": "python -m services.serve"}
    with atomic_dir(Path(out_dir)) as staging:
        bentoml.bentos.export_bento(bento_tag, str(staging / ARCHIVE))
        write_json(staging / "bento.json", summary)
    print(f"package: {bento_tag} -> {Path(out_dir) / ARCHIVE}", flush=True)
    return summary
