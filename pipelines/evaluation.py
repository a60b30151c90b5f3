"""Evaluating a trained model on the test split: metrics for DVC, plots for DVC and people, both into MLflow.

`run_evaluation` writes flat `test_*` scalars (for `dvc metrics show/diff`), a plots folder of JSON
records for `dvc plots show` (learning curve, PR curves per class, per-class values, the confusion
records of a classifier) and an images folder of PNGs (declared as DVC image plots: a folder holding
only images, so every task's pictures show without a dvc.yaml entry each), and adds them to the
model's training run in MLflow.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import pipelines.runtime as runtime
from models import _checkpoint as checkpoint
from pipelines import tracking
from pipelines.engine import EngineSettings, evaluate_report
from pipelines.errors import ConvForgeError
from pipelines.metrics import SERVED_SETTINGS
from pipelines.params import Params
from pipelines.plots import (confusion_records, plot_confusion, plot_learning_curves, plot_pr_curve,
                             write_visuals)
from pipelines.tasks import get_task

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def per_class_records(per_class: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One record per class with each per-class metric as a column."""
    names = list(next(iter(per_class.values()), {}))
    return [{"class": name, **{metric: values.get(name, -1.0) for metric, values in per_class.items()}}
            for name in names]


def write_plots(task: str, report: Any, history: list[dict[str, Any]], model: Any, data: Any, folder: Path,
                images: Path) -> None:
    """Every plot of the evaluation: JSON records for DVC into `folder`, PNGs for people into `images`."""
    folder, images = Path(folder), Path(images)
    if history:
        runtime.write_json(folder / "learning_curve.json", history)
        plot_learning_curves(history, images / "learning_curves.png")
    if report.curves:
        runtime.write_json(folder / "pr_curve.json", same_fields(report.curves))
        plot_pr_curve(report.curves, images / "pr_curve.png", title=get_task(task).pr_title)
    if report.per_class:
        runtime.write_json(folder / "per_class.json", per_class_records(report.per_class))
    for stem, records in report.records.items():  # e.g. regress's predicted-vs-true scatter
        runtime.write_json(folder / f"{stem}.json", records)
    if get_task(task).confusion and report.confusion is not None:
        runtime.write_json(folder / "confusion.json", confusion_records(report.confusion, data.classes))
        plot_confusion(report.confusion, data.classes, images / "confusion_matrix.png")
    write_visuals(model, task, data, images)


def same_fields(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records with only the fields all of them have: DVC's plots fail on a file whose records differ
    (detect's served-detections curve has a `threshold` the COCO curve lacks; the PNG shows both)."""
    common = set.intersection(*(set(record) for record in records)) if records else set()
    return [{key: value for key, value in record.items() if key in common} for record in records]


def run_evaluation(params: Params, task: str, data_root: Path, model_dir: Path, metrics_path: Path,
                   plots_dir: Path, images_dir: Path | None = None, *, root: Path = PROJECT_ROOT,
                   log: Callable[[str], None] = print) -> dict[str, float]:
    """Test metrics and plots of the model in `model_dir` (PNGs in `images_dir`, else with the JSON in
    `plots_dir`); returns the metrics written."""
    model, config = checkpoint.load(Path(model_dir))
    if config.get("task") != task:
        raise ConvForgeError(f"{model_dir}: holds a {config.get('task')!r} model, not {task!r}")
    test = get_task(task).load_split(data_root, "test")
    if list(test.classes) != list(config.get("classes", test.classes)):
        raise ConvForgeError(f"{model_dir}: trained on classes {config['classes']}, but the test data has "
                             f"{test.classes}; rerun `dvc repro train@{task}`")
    # At the model's own serving settings (a detector's score threshold, chosen on val), as served
    meter = get_task(task).meter(test.classes, **{key: config[key] for key in SERVED_SETTINGS if key in config})
    report = evaluate_report(model, task, test, EngineSettings.from_params(params), meter=meter)
    # Scalars only, so `dvc metrics show` stays readable; per-class values go to per_class.json and MLflow.
    metrics = {f"test_{key}": round(value, 6) for key, value in report.scalars.items()}
    metrics["test_items"] = len(test)
    history_path = Path(model_dir) / "history.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else []

    runtime.write_json(metrics_path, metrics)
    with ExitStack() as stack:
        staging = stack.enter_context(runtime.atomic_dir(plots_dir))
        pictures = staging if images_dir is None else stack.enter_context(runtime.atomic_dir(images_dir))
        write_plots(task, report, history, model, test, staging, pictures)
    outputs = {"evaluation": metrics_path, "evaluation/plots": plots_dir}
    if images_dir is not None:
        outputs["evaluation/images"] = images_dir
    log_to_run(params, config.get("mlflow_run_id"), report.flat("test_"), outputs, root, log)
    log(f"evaluate {task}: " + "  ".join(f"{k}={v:.4f}" for k, v in report.scalars.items())
        + f"  ({len(test)} test items); wrote " + ", ".join(str(path) for path in outputs.values()))
    return metrics


def log_to_run(params: Params, run_id: str | None, metrics: dict[str, float], outputs: dict[str, Path],
               root: Path, log: Callable[[str], None]) -> None:
    """Add the test metrics and the evaluation's files (`{artifact path: local path}`) to the training run,
    when the store still has it."""
    if not run_id:
        return
    uri = tracking.configure(params.mlflow, root)
    if not tracking.run_exists(run_id):
        log(f"note: MLflow run {run_id} not found in the store {uri}; test metrics were written to reports/ only")
        return
    tracking.add_to_run(run_id, metrics, outputs)
