"""Ray Tune wiring of the search: Ray itself, schedulers, the search algorithm, the trial, the Tuner,
and the trials read back from Ray's saved state.

Trials are maximized on their task's primary validation metric and report once per epoch with a
checkpoint, which is what schedulers, retries and resuming need.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm, Searcher
from ray.tune.search.optuna import OptunaSearch

from models import build, family
from models._checkpoint import apply_transfer
from pipelines.engine import EngineSettings, EpochResult, fit
from pipelines.errors import ConvForgeError
from pipelines.geometry import family_geometry
from pipelines.params import PolicyParams, SearchParams, TaskSearchParams, TrainConfig
from pipelines.search_space import SearchSpace

MODE = "max"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Generated trees a Ray cluster's workers never need (Ray also honours .gitignore).
UPLOAD_EXCLUDES = ["data/", "artifacts/", "reports/", "ray_results/", "mlruns/", "mlartifacts/", "*.db",
                   ".venv/", ".dvc/cache/", "bench/results/", "bentos/"]

# Read by the Tune driver. Every epoch's checkpoint forces an experiment snapshot (num_to_keep is set),
# which is what resuming needs: Ray's warning that snapshots are frequent is noise for short epochs.
# Ctrl-C stops the stage (Tune's own handler would return as if the search had ended).
TUNE_ENV = {"TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0", "TUNE_DISABLE_SIGINT_HANDLER": "1"}


@dataclass(frozen=True)
class TrialData:
    """Where a trial reads its data: the prepared-data folder, and the seeded train subset. Trials load
    the splits themselves (lazily when large), so no array travels through Ray's object store; on a
    multi-node cluster `root` must be a path every node sees."""

    root: str
    train_subset: int | None
    seed: int
    # Worked out once by the driver: the detector geometry of the train subset's boxes, and each
    # `pretrained` choice resolved to its weights (a missing one is the driver's one-line error).
    geometry: dict[str, Any] = field(default_factory=dict)
    pretrained: dict[str, str] = field(default_factory=dict)

    def load(self, task: str) -> tuple[Any, Any]:
        """The (train subset, val) splits of `task`, as its adapter loads them."""
        from pipelines.tasks import get_task

        adapter = get_task(task)
        return (adapter.load_split(Path(self.root), "train").subset(self.train_subset, self.seed),
                adapter.load_split(Path(self.root), "val"))


@dataclass(frozen=True)
class Experiment:
    """One search's trials: what they train, on which data, and where Ray Tune keeps their state."""

    task: str
    metric: str  # the task's primary validation metric, maximized
    space: SearchSpace
    budget: TaskSearchParams
    base: TrainConfig  # what each trial's choice is applied to; its epochs are the budget's max_epochs
    train: Any
    val: Any
    storage: str  # a folder or a URI
    name: str
    data: TrialData | None = None  # what trials load (train/val above are the driver's copy)

    @property
    def path(self) -> str:
        """Where Ray Tune keeps this experiment."""
        return f"{self.storage.rstrip('/')}/{self.name}"


def trial_base(cfg: TrainConfig, max_epochs: int) -> TrainConfig:
    """`cfg` as a trial trains it: `max_epochs` epochs, warm-up cut to fit."""
    return cfg.updated(epochs=max_epochs, warmup_epochs=min(cfg.warmup_epochs, max_epochs - 1))


def make_scheduler(kind: str, max_epochs: int, grace_period: int, reduction_factor: int,
                   space: SearchSpace) -> TrialScheduler:
    """ASHA (Li et al. 2020), HyperBand (Li et al. 2018) or PBT (Jaderberg et al. 2017), stepping per epoch."""
    if kind == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=max_epochs,
                             grace_period=min(grace_period, max_epochs), reduction_factor=reduction_factor)
    if kind == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", max_t=max_epochs,
                                  reduction_factor=reduction_factor)
    if kind == "pbt":
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=1,
                                       hyperparam_mutations=space.mutations())
    raise ConvForgeError(f"search.scheduler: expected one of asha, hyperband, pbt, got {kind!r}")


def make_search_alg(algorithm: str, space: SearchSpace, metric: str, points: list[dict[str, Any]],
                    max_concurrent: int, seed: int) -> SearchAlgorithm | Searcher:
    """Optuna TPE over the conditional space (behind a ConcurrencyLimiter), or Ray's seeded random search."""
    if algorithm == "optuna":
        # TPE models the space from the families' starting points on (its default waits for 10 trials,
        # more than a CPU budget has); `group` fits each conditional branch on the trials that have it.
        with warnings.catch_warnings():  # multivariate/group are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, len(points)),
                                                 multivariate=True, group=True)
        searcher = OptunaSearch(space=space, metric=metric, mode=MODE, sampler=sampler,
                                points_to_evaluate=[space.optuna_point(p) for p in points])
        return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    if algorithm == "random":
        return BasicVariantGenerator(points_to_evaluate=points, max_concurrent=max_concurrent, random_state=seed)
    raise ConvForgeError(f"search.algorithm: expected optuna or random, got {algorithm!r}")


def init_ray(address: str | None = None, num_cpus: int | None = None, log: Callable[[str], None] = print) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray; either way workers import the project.

    Returns whether this call started or joined Ray (False when the process was already connected).
    """
    for key, value in TUNE_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Same code on every node: the project travels as the job's working_dir.
        log(f"connecting to the Ray cluster at {address}")
        ray.init(address=address, log_to_driver=True,
                 runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": UPLOAD_EXCLUDES})
        return True
    num_cpus = num_cpus or len(os.sched_getaffinity(0))
    pythonpath = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    log(f"starting a local Ray with {num_cpus} CPU(s)")
    # address="local": a new Ray of our own, never one that another process left running here.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
             object_store_memory=512 * 2**20, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    return True


def train_trial(config: dict[str, Any], *, task: str, space: SearchSpace, data: TrialData,
                base: TrainConfig, settings: EngineSettings, policy: PolicyParams) -> None:
    """One trial: load its data from `data`'s paths, build the chosen family, train it with the engine
    (`base` with the trial's choice), report and checkpoint every epoch."""
    train_data, val_data = data.load(task)
    chosen = space.choice(config)
    cfg = base.updated(**chosen.train)
    # The trial builds what the final training builds: geometry from its data, the trunk from `pretrained`.
    hparams = {**family_geometry(data.geometry, family(task, chosen.family).defaults), **chosen.hparams}
    model = build(task, chosen.family, len(train_data.classes), train_data.in_channels, train_data.image_size,
                  **hparams)
    if cfg.pretrained:
        apply_transfer(model, pretrained=data.pretrained[cfg.pretrained])
    node_id = ray.get_runtime_context().get_node_id()
    name = tune.get_context().get_trial_name()
    with tempfile.TemporaryDirectory(prefix="convforge-trial-") as work:
        checkpoint_dir = Path(work) / "engine"
        checkpoint_dir.mkdir()
        restored = tune.get_checkpoint()
        if restored is not None:  # a retried, resumed or PBT-exploited trial goes on from its last epoch
            restored.to_directory(str(checkpoint_dir))

        def on_epoch(result: EpochResult) -> None:
            metrics = {key: value for key, value in result.metrics.items() if isinstance(value, (int, float))}
            tune.report({**metrics, "score": result.score, "epoch": result.epoch, "node_id": node_id},
                        checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

        fit(model, task, train_data, val_data, cfg, settings, policy=policy, checkpoint_dir=checkpoint_dir,
            on_epoch=on_epoch, log=lambda message: print(f"[{name} {chosen.family}] {message}", flush=True))


def trial_dirname(trial: Trial) -> str:
    """Short trial folder names (Ray's default spells out the whole config)."""
    return f"trial_{trial.trial_id}"


def make_tuner(trainable: Any, experiment: Experiment, search: SearchParams, seed: int,
               callbacks: list[tune.Callback], log: Callable[[str], None] = print) -> tune.Tuner:
    """A new Tuner, or the interrupted one at the experiment's path restored (finished trials are kept, not rerun)."""
    if tune.Tuner.can_restore(experiment.path):
        log(f"resuming the search at {experiment.path}")
        return tune.Tuner.restore(experiment.path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    space, budget = experiment.space, experiment.budget
    points = space.points(experiment.base)[:budget.num_samples]
    tune_config = tune.TuneConfig(
        metric=experiment.metric, mode=MODE,
        search_alg=make_search_alg(search.algorithm, space, experiment.metric, points, search.max_concurrent, seed),
        scheduler=make_scheduler(search.scheduler, budget.max_epochs, budget.grace_period, search.reduction_factor,
                                 space),
        num_samples=budget.num_samples, time_budget_s=budget.time_budget_s,
        reuse_actors=True, trial_dirname_creator=trial_dirname,
    )
    run_config = tune.RunConfig(
        name=experiment.name, storage_path=experiment.storage, callbacks=callbacks, verbose=1,
        failure_config=tune.FailureConfig(max_failures=search.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
    )
    resources = {"cpu": search.cpus_per_trial, "gpu": search.gpus_per_trial}
    return tune.Tuner(tune.with_resources(trainable, resources),
                      param_space=space.ray_space() if search.algorithm == "random" else None,
                      tune_config=tune_config, run_config=run_config)


def run_trials(experiment: Experiment, search: SearchParams, seed: int, settings: EngineSettings,
               policy: PolicyParams, callbacks: list[tune.Callback], log: Callable[[str], None] = print) -> None:
    """Fit the experiment's Tuner (new or restored) on the Ray at `search.ray_address`, else a local one."""
    started_ray = init_ray(search.ray_address, log=log)
    try:
        # Trials get paths, not arrays: each loads its splits from disk (memory-mapped when large), so the
        # object store (512 MiB locally) carries only the small arguments.
        trainable = tune.with_parameters(train_trial, task=experiment.task, space=experiment.space,
                                         data=experiment.data, base=experiment.base, settings=settings, policy=policy)
        make_tuner(trainable, experiment, search, seed, callbacks, log).fit()
    finally:
        if started_ray:  # free the cores for what follows (profiling)
            ray.shutdown()


def is_saved(experiment: Experiment) -> bool:
    """Whether Ray Tune's state of the experiment exists (it can be resumed or read back)."""
    return tune.Tuner.can_restore(experiment.path)


@dataclass(frozen=True)
class TrialRecord:
    """One trial's outcome as the search stage reports it."""

    trial_id: str
    family: str
    hparams: dict[str, Any]
    train: dict[str, Any]
    status: str  # completed | stopped (by the scheduler or the time budget) | error
    score: float | None
    epochs: int
    node_id: str | None
    error: str | None


def trial_records(experiment: Experiment) -> list[TrialRecord]:
    """Every trial of the experiment, read back from Ray Tune's saved state."""
    metric, max_epochs = experiment.metric, experiment.budget.max_epochs
    analysis = tune.ExperimentAnalysis(experiment.path, default_metric=metric, default_mode=MODE)
    records = []
    for trial in analysis.trials:
        if not trial.config or "family" not in trial.config:
            continue
        chosen = experiment.space.choice(trial.config)
        last = trial.last_result or {}
        epochs = int(last.get("epoch", 0) or 0)
        score = last.get(metric)
        error = None
        if trial.status == Trial.ERROR:
            status = "error"
            error = error_line(trial)
        else:
            status = "completed" if epochs >= max_epochs else "stopped"
        usable = isinstance(score, (int, float)) and math.isfinite(score)
        records.append(TrialRecord(trial.trial_id, chosen.family, chosen.hparams, chosen.train, status,
                                   float(score) if usable else None, epochs, last.get("node_id"), error))
    return records


def error_line(trial: Trial) -> str:
    """The last line of a failed trial's traceback (its exception), or a generic note."""
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "trial failed"
