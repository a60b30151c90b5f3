"""Stage `train@task`: train the search's best config on train, select the epoch on val, log it all to MLflow.

`python -m pipelines.stages.train classify|detect|segment` reads `artifacts/search/<task>/best.json`
(family, hparams, tuned TrainConfig keys), trains with the engine, and writes
`artifacts/models/<task>/` (model.safetensors + config.json + history.json). The MLflow run holds
params, per-epoch and system metrics, the dataset, plots and the model (registered as
`<prefix>-<task>`, alias `champion` when it is the best so far). An interrupted run resumes at
its last finished epoch when the stage is rerun with the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import pipelines.runtime as runtime  # first: telemetry off before the stack is imported
from pipelines.errors import ConvForgeError, stage_entry
from pipelines.params import TASKS, Params, load_params

DATA = {"classify": "classify", "detect": "scenes", "segment": "scenes"}
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def parse_task(argv: list[str], stage: str) -> str:
    """The task argument of `python -m pipelines.<stage> <task>`."""
    if len(argv) != 2 or argv[1] not in TASKS:
        raise ConvForgeError(f"usage: python -m pipelines.{stage} {{{'|'.join(TASKS)}}}")
    return argv[1]


def load_split(task: str, root: Path, split: str) -> Any:
    """A prepared split of the task's data as in-memory tensors."""
    from pipelines.datasets import load_classify, load_scenes

    return (load_classify if task == "classify" else load_scenes)(Path(root), split)


def read_best(path: Path, task: str) -> dict[str, Any]:
    """The search's choice for `task` (best.json), checked for the keys training needs."""
    path = Path(path)
    if not path.is_file():
        raise ConvForgeError(f"{path} not found: run `dvc repro search@{task}` first")
    try:
        best = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConvForgeError(f"{path}: not valid JSON ({exc})") from None
    missing = [key for key in ("family", "model") if key not in best]
    if missing:
        raise ConvForgeError(f"{path}: missing key(s) {missing}; rerun `dvc repro search@{task}`")
    return best


def git_commit(root: Path) -> str | None:
    """The checked-out commit, or None outside git or before the first commit."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def resume_key(task: str, family: str, hparams: dict[str, Any], cfg: Any, digest: str, params: Params) -> str:
    """Same key, same training: the checkpoint of an interrupted run is only resumed by an identical one."""
    inputs = {"task": task, "family": family, "hparams": hparams, "train": cfg.model_dump(), "data": digest,
              "seed": params.seed, "deterministic": params.deterministic, "policy": params.augment.policy.model_dump()}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_training(params: Params, task: str, data_root: Path, best_path: Path, out_dir: Path, *,
                 root: Path = PROJECT_ROOT, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, log, register and save the model of `task`; returns its config.json content."""
    best = read_best(best_path, task)  # before the heavy imports: a missing file is a quick one-line error
    import mlflow
    import torch

    from models import _checkpoint as checkpoint
    from models._registry import build, family as registry_family
    from pipelines import tracking
    from pipelines.engine import EngineSettings, evaluate_report, fit, predict
    from pipelines.mlflow_model import pyfunc_output
    from pipelines.plots import learning_curve_records, plot_confusion, plot_learning_curves, write_visuals
    from pipelines.tasks import PRIMARY

    train = load_split(task, data_root, "train")
    val = load_split(task, data_root, "val")
    cfg = params.train.task(task).updated(**best.get("train", {}))
    try:
        hparams = {**registry_family(task, best["family"]).defaults, **best["model"]}
        torch.manual_seed(params.seed)
        model = build(task, best["family"], len(train.classes), train.in_channels, train.image_size, **hparams)
    except KeyError as exc:
        raise ConvForgeError(f"{best_path}: {exc.args[0]}") from None
    settings = EngineSettings.from_params(params)
    digest = tracking.data_hash(Path(data_root), root)
    metric = PRIMARY[task]
    registered = f"{params.mlflow.registered_model_prefix}-{task}"

    uri = tracking.configure(params.mlflow, root)
    experiment_id = tracking.ensure_experiment(params.mlflow.experiment)
    key = resume_key(task, best["family"], hparams, cfg, digest, params)
    work = Path(out_dir).parent / f".{Path(out_dir).name}-resume-{key}"  # per-epoch checkpoints until done
    work.mkdir(parents=True, exist_ok=True)
    run_file = work / "mlflow_run_id"
    resumed_run = run_file.read_text().strip() if run_file.is_file() else None
    if resumed_run and not tracking.run_exists(resumed_run):  # e.g. MLFLOW_TRACKING_URI changed meanwhile
        resumed_run = None
    log(f"train {task}: {best['family']} {hparams} on {len(train)} items, {cfg.epochs} epochs; MLflow {uri}")

    with mlflow.start_run(run_id=resumed_run, experiment_id=None if resumed_run else experiment_id,
                          run_name=f"train-{task}-{best['family']}",
                          tags={"convforge.task": task, "convforge.stage": "train", "convforge.family": best["family"]},
                          log_system_metrics=tracking.system_metrics_available()) as run:
        run_id = run.info.run_id
        run_file.write_text(run_id)
        if resumed_run is None:
            tracking.log_params({"task": task, "family": best["family"], "model": hparams, "train": cfg.model_dump(),
                                 "engine": asdict(settings), "policy": params.augment.policy.model_dump(),
                                 "data_hash": digest, "num_train": len(train), "num_val": len(val),
                                 "search_trial_id": best.get("trial_id"), "search_run_id": best.get("mlflow_run_id")})
            for split, data in (("train", train), ("val", val)):
                tracking.log_dataset(data.images.numpy(), (data.labels if task == "classify" else data.masks).numpy(),
                                     f"{DATA[task]}-{split}", str(Path(data_root).resolve()), digest, split)

        result = fit(model, task, train, val, cfg, settings, policy=params.augment.policy, checkpoint_dir=work,
                     on_epoch=lambda r: tracking.log_metrics(r.metrics, step=r.epoch), log=log)
        report = evaluate_report(result.model, task, val, settings)
        tracking.log_metrics({f"best_{metric}": result.best_score, "best_epoch": result.best_epoch,
                              "train_images_per_s": result.images_per_s, **report.flat("best_val_")})

        with tempfile.TemporaryDirectory(prefix="convforge-plots-") as plots, runtime.atomic_dir(out_dir) as staging:
            plots_dir = Path(plots)
            plot_learning_curves(learning_curve_records(result.history), plots_dir / "learning_curves.png")
            if task == "classify" and report.confusion is not None:
                plot_confusion(report.confusion, train.classes, plots_dir / "confusion_matrix_val.png")
            write_visuals(result.model, task, val, plots_dir)
            mlflow.log_artifacts(str(plots_dir), "plots")

            config = {"task": task, "family": best["family"], "hparams": hparams, "num_classes": len(train.classes),
                      "in_channels": train.in_channels, "image_size": train.image_size, "classes": train.classes,
                      "mean": train.mean, "std": train.std, "train": cfg.model_dump(), "data_hash": digest,
                      "metric": metric, "val_score": result.best_score, "best_epoch": result.best_epoch,
                      "mlflow_run_id": run_id, "registered_model": registered, "registered_version": None,
                      "search_trial_id": best.get("trial_id"), "git_commit": git_commit(root)}
            checkpoint.save(result.model, config, staging)
            runtime.write_json(staging / "history.json", learning_curve_records(result.history))

            example = train.images[:2].numpy()
            output = pyfunc_output(task, predict(result.model, task, train.images[:2], train.mean, train.std,
                                                 EngineSettings(device="cpu", amp="off", channels_last=False)),
                                   list(train.classes))
            version = tracking.log_model(staging, example, output, registered)
            champion = tracking.promote(registered, version.version, metric, result.best_score, digest)
            config["registered_version"] = int(version.version)
            runtime.write_json(staging / "config.json", config)
            mlflow.set_tags({"convforge.registered_version": version.version, "convforge.champion": str(champion)})

    shutil.rmtree(work, ignore_errors=True)
    log(f"train {task}: best {metric} {result.best_score:.4f} at epoch {result.best_epoch}, "
        f"{result.images_per_s:.0f} img/s; registered {registered} v{version.version}"
        f"{' (champion)' if champion else ''}; wrote {out_dir}")
    return config


@stage_entry
def main() -> None:
    task = parse_task(sys.argv, "train")
    params = load_params()
    runtime.seed_everything(params.seed, params.deterministic)
    runtime.set_threads(params.train.num_threads)
    run_training(params, task, Path("data/prepared") / DATA[task], Path("artifacts/search") / task / "best.json",
                 Path("artifacts/models") / task)


if __name__ == "__main__":
    main()
