"""Training one task's model: the search's choice trained on train, its epoch selected on val, tracked, saved.

`run_training` reads the search's `best.json` (family, hparams, tuned TrainConfig keys), trains with
the engine and writes the model folder: model.safetensors + config.json + history.json, the files
the logged MLflow model holds too, and registration.json (the registered version, known only once
the model is logged, so never part of it). The MLflow run holds params, per-epoch and system
metrics, the datasets, plots and the model (registered as `<prefix>-<task>`; the promote stage moves
the alias `champion` once the model's test metrics pass its gate). An interrupted run resumes at its
last finished epoch when it is run again with the same inputs and code.

Transfer learning: `train.<task>.pretrained` names the trunk's starting weights (another task's trained
model, a saved model's folder or `torchvision:<Weights>` from the local torch cache), loaded by name
and shape where the model is built; `freeze` and `unfreeze_epoch` are the engine's (pipelines/engine.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

import pipelines.runtime as runtime
from models import _checkpoint as checkpoint
from pipelines import distributed, tracking
from pipelines.engine import EngineSettings, FitResult, computing, evaluate_report, fit
from pipelines.errors import ConvForgeError
from pipelines.metrics import SERVED_SETTINGS
from pipelines.params import Params, PolicyParams, TrainConfig
from pipelines.plots import learning_curve_records, plot_confusion, plot_learning_curves, write_visuals
from pipelines.recipe import run_config, run_model
from pipelines.tasks import PRIMARY, get_task
from pipelines.transfer import pretrained_source

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUN_ID_FILE = "mlflow_run_id"  # in the resume folder: a resumed run logs into the same MLflow run


@dataclass(frozen=True)
class TrainingJob:
    """One training run's model, data and settings, before its first epoch."""

    task: str
    family: str
    hparams: dict[str, Any]
    cfg: TrainConfig
    model: nn.Module
    train: Any
    val: Any
    settings: EngineSettings
    policy: PolicyParams
    data_root: Path
    data_hash: str
    best: dict[str, Any]  # the search's choice, for its trial and run ids
    transfer: dict[str, Any] | None = None  # how the pretrained weights loaded (None: trained from scratch)

    @property
    def metric(self) -> str:
        return PRIMARY[self.task]


def read_best(path: Path, task: str) -> dict[str, Any]:
    """The search's choice for `task` (best.json), checked for the keys training needs."""
    path = Path(path)
    if not path.is_file():
        raise ConvForgeError(f"{path} not found: run `dvc repro search@{task}` first")
    try:
        best = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConvForgeError(f"{path}: not valid JSON ({exc})") from None
    missing = [key for key in ("family", "model") if not isinstance(best, dict) or key not in best]
    if missing:
        raise ConvForgeError(f"{path}: missing key(s) {missing}; rerun `dvc repro search@{task}`")
    if not isinstance(best["model"], dict) or not isinstance(best.get("train", {}), dict):
        raise ConvForgeError(f"{path}: `model` and `train` must be objects of hyperparameters; "
                             f"rerun `dvc repro search@{task}`")
    return best


def prepare(params: Params, task: str, data_root: Path, best_path: Path, root: Path,
            log: Callable[[str], None] = print) -> TrainingJob:
    """Step 1: the search's choice (best.json) built as a model (seeded, its trunk from `pretrained`), the data
    loaded, the config merged."""
    return prepare_choice(params, task, data_root, read_best(best_path, task), root, log, str(best_path))


def prepare_choice(params: Params, task: str, data_root: Path, best: dict[str, Any], root: Path,
                   log: Callable[[str], None] = print, source_name: str = "best.json") -> TrainingJob:
    """`prepare` of a choice in hand (best.json's keys: family, model, train), e.g. any trial of a search;
    `source_name` names it in errors."""
    adapter = get_task(task)
    train, val = adapter.load_split(data_root, "train"), adapter.load_split(data_root, "val")
    # As a trial sets up its run (pipelines/recipe.py): a trial of E epochs is this training for E epochs.
    cfg = run_config(params.train.task(task), **best.get("train", {}))
    source = pretrained_source(cfg.pretrained, task, root)
    try:
        # The detector's pyramid and anchors fitted to the training boxes, recorded in config.json with the rest
        hparams, model, transfer = run_model(task, best["family"], best["model"], train, params.seed,
                                             pretrained=source, log=log)
    except (KeyError, TypeError, ValueError) as exc:  # a family or hyperparameter value its builder refuses
        raise ConvForgeError(f"{source_name}: {best['family']} {best['model']}: "
                             f"{exc.args[0] if exc.args else exc}") from None
    return TrainingJob(task, best["family"], hparams, cfg, model, train, val, EngineSettings.from_params(params),
                       params.augment.policy, data_root, tracking.data_hash(data_root, root), best, transfer)


def resume_key(job: TrainingJob, params: Params) -> str:
    """Same key, same training: the checkpoint of an interrupted run is only resumed by an identical one, on the
    same code."""
    inputs = {"task": job.task, "family": job.family, "hparams": job.hparams, "train": job.cfg.model_dump(),
              "data": job.data_hash, "seed": params.seed, "deterministic": params.deterministic,
              "policy": job.policy.model_dump(), "code": tracking.code_hash(),
              "engine": computing(job.settings.recorded())}
    if job.transfer is not None:  # new pretrained weights (e.g. a retrained classifier): a new run
        inputs["pretrained"] = job.transfer
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resumable_run(work: Path) -> str | None:
    """The MLflow run an interrupted attempt of this training opened, if the store still has it."""
    run_file = work / RUN_ID_FILE
    run_id = run_file.read_text().strip() if run_file.is_file() else None
    return run_id if run_id and tracking.run_exists(run_id) else None  # gone when MLFLOW_TRACKING_URI changed


def log_inputs(job: TrainingJob) -> None:
    """The new run's params and datasets (what it trains, on what, how)."""
    adapter = get_task(job.task)
    chosen, hardware = job.settings.choice(), runtime.probe()
    tracking.set_tags({tracking.tags.DEVICE: runtime.device_line(chosen, hardware).removeprefix("device: ")})
    tracking.log_params({"task": job.task, "family": job.family, "model": job.hparams, "train": job.cfg.model_dump(),
                         "engine": job.settings.recorded(), "hardware": runtime.device_record(chosen, hardware),
                         "policy": job.policy.model_dump(),
                         "data_hash": job.data_hash, "num_train": len(job.train), "num_val": len(job.val),
                         "search_trial_id": job.best.get("trial_id"), "search_run_id": job.best.get("mlflow_run_id")})
    for split, data in (("train", job.train), ("val", job.val)):
        tracking.log_dataset(data.images.numpy(), adapter.target_array(data).numpy(), f"{adapter.data}-{split}",
                             str(Path(job.data_root).resolve()), job.data_hash, split)


def fit_model(job: TrainingJob, work: Path, log: Callable[[str], None]) -> FitResult:
    """Step 2: train with the engine, checkpointing every epoch into `work` and logging its metrics."""
    return fit(job.model, job.task, job.train, job.val, job.cfg, job.settings, policy=job.policy,
               checkpoint_dir=work, on_epoch=lambda r: tracking.log_metrics(r.metrics, step=r.epoch), log=log)


def record(job: TrainingJob, result: FitResult) -> dict[str, float]:
    """Step 3: the selected epoch's validation report and the training plots, into the run; returns what
    the report chose for serving (SERVED_SETTINGS: a detector's score threshold, at max F1 on val)."""
    report = evaluate_report(result.model, job.task, job.val, job.settings)
    tracking.log_metrics({f"best_{job.metric}": result.best_score, "best_epoch": result.best_epoch,
                          "train_images_per_s": result.images_per_s, **report.flat("best_val_")})
    with tempfile.TemporaryDirectory(prefix="convforge-plots-") as plots:
        folder = Path(plots)
        plot_learning_curves(learning_curve_records(result.history), folder / "learning_curves.png")
        if get_task(job.task).confusion and report.confusion is not None:
            plot_confusion(report.confusion, job.train.classes, folder / "confusion_matrix_val.png")
        write_visuals(result.model, job.task, job.val, folder)
        tracking.log_artifacts(folder, "plots")
    return {key: report.scalars[key] for key in SERVED_SETTINGS if key in report.scalars}


def model_config(job: TrainingJob, result: FitResult, run_id: str, registered: str, root: Path) -> dict[str, Any]:
    """config.json: what rebuilds the model, how it was trained, and where it came from."""
    data = job.train
    return {"task": job.task, "family": job.family, "hparams": job.hparams, "num_classes": len(data.classes),
            "in_channels": data.in_channels, "image_size": data.image_size, "classes": data.classes,
            "mean": data.mean, "std": data.std, "train": job.cfg.model_dump(), "data_hash": job.data_hash,
            "metric": job.metric, "val_score": result.best_score, "best_epoch": result.best_epoch,
            "mlflow_run_id": run_id, "registered_model": registered, "search_trial_id": job.best.get("trial_id"),
            "git_commit": tracking.git_commit(root),
            **({"source_size": data.source_size} if getattr(data, "source_size", None) else {})}


def save(job: TrainingJob, result: FitResult, config: dict[str, Any], out_dir: Path) -> tracking.Registration:
    """Step 4: the model folder, each file written once; the run logs and registers the folder as it is."""
    with runtime.atomic_dir(out_dir) as staging:
        sha = checkpoint.save(result.model, config, staging)
        runtime.write_json(staging / "history.json", learning_curve_records(result.history))
        card = tracking.ModelCard(job.task, job.family, job.metric, result.best_score, job.data_hash, sha,
                                  result.best_epoch)
        registration = tracking.register_model(staging, result.model, job.train, config["registered_model"], card)
        runtime.write_json(staging / checkpoint.REGISTRATION, {"registered_model": registration.name,
                                                    "registered_version": registration.version})
    return registration


def run_training(params: Params, task: str, data_root: Path, best_path: Path, out_dir: Path, *,
                 root: Path = PROJECT_ROOT, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, log, register and save the model of `task`; returns config.json's content with registration.json's."""
    job = prepare(params, task, Path(data_root), Path(best_path), root, log)
    uri = tracking.configure(params.mlflow, root)
    experiment_id = tracking.ensure_experiment(params.mlflow.experiment)
    key, workers = resume_key(job, params), distributed.Workers.from_params(params)
    work = Path(out_dir).parent / f".{Path(out_dir).name}-resume-{key}"  # until done
    work.mkdir(parents=True, exist_ok=True)
    resumed = resumable_run(work)
    log(f"train {task}: {job.family} {job.hparams} on {len(job.train)} items, {job.cfg.epochs} epochs; MLflow {uri}")
    with tracking.training_run(experiment_id, resumed, task, job.family) as run_id:
        (work / RUN_ID_FILE).write_text(run_id)
        if resumed is None:
            log_inputs(job)
            tracking.log_params({"workers": workers.count})
        result = (fit_model(job, work, log) if workers.count == 1 else  # Ray Train: DDP on N workers
                  distributed.fit_on_workers(job, workers, run_id, f"train-{task}-{key}", log))
        served = record(job, result)
        config = model_config(job, result, run_id, tracking.registered_name(params.mlflow.registered_model_prefix,
                                                                            task), root) | served
        registration = save(job, result, config, out_dir)
    shutil.rmtree(work, ignore_errors=True)
    log(f"train {task}: best {job.metric} {result.best_score:.4f} at epoch {result.best_epoch}, "
        f"{result.images_per_s:.0f} img/s; registered {registration.name} v{registration.version}"
        f" (promote@{task} decides on the champion); wrote {out_dir}")
    return {**config, "registered_version": registration.version}
