"""Stage `evaluate@task`: the trained model's metrics and plots on the test split.

`python -m pipelines.stages.evaluate classify|detect|segment` writes `reports/metrics/<task>.json` (flat
`test_*` scalars for `dvc metrics show/diff`) and `reports/plots/<task>/` (JSON records for
`dvc plots show`: learning curve, PR curve, per-class values, classify's confusion records; and
PNGs), and adds both to the training run in MLflow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import pipelines.runtime as runtime  # first: telemetry off before the stack is imported
from pipelines.errors import ConvForgeError, stage_entry
from pipelines.params import Params, load_params
from pipelines.stages.train import DATA, PROJECT_ROOT, load_split, parse_task


def per_class_records(per_class: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One record per class with each per-class metric as a column."""
    names = list(next(iter(per_class.values()), {}))
    return [{"class": name, **{metric: values.get(name, -1.0) for metric, values in per_class.items()}}
            for name in names]


def write_plots(task: str, report: Any, history: list[dict[str, Any]], model: Any, data: Any, folder: Path) -> None:
    """Every plot of the evaluate stage into `folder`: JSON records for DVC, PNGs for people."""
    from pipelines.plots import (confusion_records, plot_confusion, plot_learning_curves, plot_pr_curve,
                                 write_visuals)

    folder = Path(folder)
    if history:
        runtime.write_json(folder / "learning_curve.json", history)
        plot_learning_curves(history, folder / "learning_curves.png")
    if report.curves:
        runtime.write_json(folder / "pr_curve.json", report.curves)
        plot_pr_curve(report.curves, folder / "pr_curve.png",
                      title="precision-recall at IoU 0.5" if task == "detect" else "precision-recall (one vs rest)")
    if report.per_class:
        runtime.write_json(folder / "per_class.json", per_class_records(report.per_class))
    if task == "classify" and report.confusion is not None:
        runtime.write_json(folder / "confusion.json", confusion_records(report.confusion, data.classes))
        plot_confusion(report.confusion, data.classes, folder / "confusion_matrix.png")
    write_visuals(model, task, data, folder)


def run_evaluation(params: Params, task: str, data_root: Path, model_dir: Path, metrics_path: Path,
                   plots_dir: Path, *, root: Path = PROJECT_ROOT, log: Callable[[str], None] = print) -> dict[str, float]:
    """Test metrics and plots of the model in `model_dir`; returns the metrics written."""
    from models import _checkpoint as checkpoint
    from pipelines.engine import EngineSettings, evaluate_report

    model, config = checkpoint.load(Path(model_dir))
    if config.get("task") != task:
        raise ConvForgeError(f"{model_dir}: holds a {config.get('task')!r} model, not {task!r}")
    test = load_split(task, data_root, "test")
    if list(test.classes) != list(config.get("classes", test.classes)):
        raise ConvForgeError(f"{model_dir}: trained on classes {config['classes']}, but the test data has "
                             f"{test.classes}; rerun `dvc repro train@{task}`")
    settings = EngineSettings.from_params(params)
    report = evaluate_report(model, task, test, settings)
    # Scalars only, so `dvc metrics show` stays readable; per-class values go to per_class.json and MLflow.
    metrics = {f"test_{key}": round(value, 6) for key, value in report.scalars.items()}
    metrics["test_items"] = len(test)
    history_path = Path(model_dir) / "history.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else []

    runtime.write_json(metrics_path, metrics)
    with runtime.atomic_dir(plots_dir) as staging:
        write_plots(task, report, history, model, test, staging)
    _log_to_run(params, config.get("mlflow_run_id"), report.flat("test_"), metrics_path, plots_dir, root, log)
    log(f"evaluate {task}: " + "  ".join(f"{k}={v:.4f}" for k, v in report.scalars.items())
        + f"  ({len(test)} test items); wrote {metrics_path} and {plots_dir}")
    return metrics


def _log_to_run(params: Params, run_id: str | None, metrics: dict[str, float], metrics_path: Path,
                plots_dir: Path, root: Path, log: Callable[[str], None]) -> None:
    """Add the test metrics and plots to the training run, when the store still has it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipelines import tracking

    if not run_id:
        return
    tracking.configure(params.mlflow, root)
    try:
        client = MlflowClient()
        client.get_run(run_id)
        tracking.log_metrics(metrics, step=0, run_id=run_id)
        client.log_artifact(run_id, str(metrics_path), "evaluation")
        client.log_artifacts(run_id, str(plots_dir), "evaluation/plots")
    except MlflowException as exc:
        log(f"note: MLflow run {run_id} not found in this store ({str(exc).splitlines()[0]}); "
            "test metrics were written to reports/ only")


@stage_entry
def main() -> None:
    task = parse_task(sys.argv, "evaluate")
    params = load_params()
    runtime.seed_everything(params.seed, params.deterministic)
    runtime.set_threads(params.train.num_threads)
    run_evaluation(params, task, Path("data/prepared") / DATA[task], Path("artifacts/models") / task,
                   Path("reports/metrics") / f"{task}.json", Path("reports/plots") / task)


if __name__ == "__main__":
    main()
