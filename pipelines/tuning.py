"""Ray Tune glue: the search space from the model registry, schedulers, the trial function, the Tuner.

A trial's config is flat: `family`, then that family's `<family>.<hparam>` keys; `optimizer`,
then `<optimizer>.lr`; then `weight_decay`, `batch_size`, `aug_strength`. Optuna (TPE) walks this
space define-by-run, so only the chosen branch's keys are sampled; Ray's random search samples
every key and the trial reads the chosen branch's (`SearchSpace.choice`).
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import optuna
import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm, Searcher
from ray.tune.search.optuna import OptunaSearch

from models._registry import Choice, FloatRange, IntRange, Space, family as registry_family
from pipelines.errors import ConvForgeError
from pipelines.params import SearchParams, TaskSearchParams, TrainConfig, TrainSpaceParams

# The primary validation metric of each task (the engine's names); every one is maximized.
METRICS = {"classify": "val_accuracy", "detect": "val_map", "segment": "val_miou"}
MODE = "max"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Generated trees a Ray cluster's workers never need (Ray also honours .gitignore).
UPLOAD_EXCLUDES = ["data/", "artifacts/", "reports/", "ray_results/", "mlruns/", "mlartifacts/", "*.db",
                   ".venv/", ".dvc/cache/", "bench/results/", "bentos/"]

# Read by the Tune driver. Every epoch's checkpoint forces an experiment snapshot (num_to_keep is set),
# which is what resuming needs: Ray's warning that snapshots are frequent is noise for short epochs.
# Ctrl-C stops the stage (Tune's own handler would return as if the search had ended).
TUNE_ENV = {"TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0", "TUNE_DISABLE_SIGINT_HANDLER": "1"}

Domain = Choice | IntRange | FloatRange


def _is_plain(values: Iterable[Any]) -> bool:
    """Optuna's categorical choices must be None, bool, int, float or str."""
    return all(v is None or isinstance(v, (bool, int, float, str)) for v in values)


def _suggest(trial: Any, key: str, domain: Domain) -> Any:
    """One Optuna suggestion for `domain` under `key`; other choices (tuples, lists) go by index."""
    if isinstance(domain, Choice):
        values = list(domain.values)
        if _is_plain(values):
            return trial.suggest_categorical(key, values)
        return values[trial.suggest_categorical(key, list(range(len(values))))]
    if isinstance(domain, IntRange):
        return trial.suggest_int(key, domain.low, domain.high, log=domain.log)
    return trial.suggest_float(key, domain.low, domain.high, log=domain.log)


def ray_domain(domain: Domain) -> Any:
    """A registry domain as a Ray Tune sampler."""
    if isinstance(domain, Choice):
        return tune.choice(list(domain.values))
    if isinstance(domain, IntRange):  # Ray's integer upper bounds are exclusive
        return (tune.lograndint if domain.log else tune.randint)(domain.low, domain.high + 1)
    if domain.low == domain.high:
        return domain.low
    return (tune.loguniform if domain.log else tune.uniform)(domain.low, domain.high)


def _cast(domain: Domain, value: Any) -> Any:
    """Plain Python values (TrainConfig is strict: an int field refuses 64.0)."""
    if isinstance(domain, IntRange):
        return int(value)
    if isinstance(domain, FloatRange):
        return float(value)
    return value


def _clamp(domain: Domain, value: Any) -> Any | None:
    """`value` moved into `domain`, or None when a choice does not offer it."""
    if isinstance(domain, Choice):
        return value if value in list(domain.values) else None
    return type(value)(min(max(value, domain.low), domain.high))


@dataclass(frozen=True)
class TrialChoice:
    """What one trial trains: a family with its hyperparameters, and TrainConfig overrides."""

    family: str
    hparams: dict[str, Any]
    train: dict[str, Any]


@dataclass(frozen=True)
class SearchSpace:
    """Families with their registry spaces, optimizers with their own keys (lr), shared training keys.

    Called with an Optuna trial it is Optuna's define-by-run space (picklable, so a restored
    search gets it back).
    """

    families: dict[str, Space]
    optimizers: dict[str, Space]
    train: Space
    defaults: dict[str, dict[str, Any]]  # each family's registry defaults, its starting point

    @classmethod
    def build(cls, task: str, family_names: list[str], space: TrainSpaceParams,
              model_space: dict[str, dict[str, list[Any]]] | None = None) -> "SearchSpace":
        """The space of `search.<task>`: each family's registry space (narrowed by `model_space`)
        plus the training space."""
        # Entries for families this search leaves out are ignored, so narrowing
        # `families` alone (e.g. `dvc exp run -S search.classify.families=[lenet5]`) stays valid.
        model_space = model_space or {}
        families, defaults = {}, {}
        for name in family_names:
            try:
                registered = registry_family(task, name)
            except KeyError as exc:
                raise ConvForgeError(f"search.{task}.families: {exc.args[0]}") from None
            families[name], defaults[name] = dict(registered.space), dict(registered.defaults)
            for key, values in model_space.get(name, {}).items():
                if key not in registered.space:
                    raise ConvForgeError(f"search.{task}.model_space.{name}.{key}: not a searched hyperparameter "
                                         f"of {name}; known: {', '.join(sorted(registered.space))}")
                families[name][key] = Choice(list(values))
        optimizers = {name: {"lr": FloatRange(*space.lr[name], log=True)} for name in space.optimizer}
        train = {
            "weight_decay": FloatRange(*space.weight_decay, log=True),
            "batch_size": Choice(list(space.batch_size)),
            "aug_strength": FloatRange(*space.aug_strength),
        }
        return cls(families, optimizers, train, defaults)

    def branches(self) -> list[tuple[str, dict[str, Space]]]:
        """The categorical keys whose value decides which `<value>.<hparam>` keys exist."""
        return [("family", self.families), ("optimizer", self.optimizers)]

    def __call__(self, trial: Any) -> dict[str, Any]:
        """Optuna define-by-run: a branch value first, then only that branch's keys."""
        chosen: dict[str, Any] = {}
        for parent, options in self.branches():
            value = trial.suggest_categorical(parent, list(options))
            chosen[parent] = value
            for name, domain in options[value].items():
                chosen[f"{value}.{name}"] = _suggest(trial, f"{value}.{name}", domain)
        for name, domain in self.train.items():
            chosen[name] = _suggest(trial, name, domain)
        return chosen

    def ray_space(self) -> dict[str, Any]:
        """Ray Tune random space: every key of every branch (a trial reads its own branch's)."""
        space: dict[str, Any] = {}
        for parent, options in self.branches():
            space[parent] = tune.choice(list(options))
            for value, hparams in options.items():
                space.update({f"{value}.{name}": ray_domain(d) for name, d in hparams.items()})
        space.update({name: ray_domain(d) for name, d in self.train.items()})
        return space

    def mutations(self) -> dict[str, Any]:
        """PBT's mutable keys: the continuous training hyperparameters (the model stays fixed)."""
        keys = {f"{opt}.{name}": d for opt, hp in self.optimizers.items() for name, d in hp.items()}
        keys.update(self.train)
        return {key: ray_domain(d) for key, d in keys.items()
                if isinstance(d, FloatRange) and d.low < d.high}

    def choice(self, config: dict[str, Any]) -> TrialChoice:
        """The active part of a trial's config."""
        family, optimizer = config["family"], config["optimizer"]
        fam_space, opt_space = self.families[family], self.optimizers[optimizer]
        hparams = {name: _cast(d, config[f"{family}.{name}"]) for name, d in fam_space.items()}
        train = {"optimizer": optimizer}
        train.update({name: _cast(d, config[f"{optimizer}.{name}"]) for name, d in opt_space.items()})
        train.update({name: _cast(d, config[name]) for name, d in self.train.items()})
        return TrialChoice(family, hparams, train)

    def points(self, base: TrainConfig) -> list[dict[str, Any]]:
        """One starting point per family: its registry defaults with the task's TrainConfig values."""
        base_values = base.model_dump()
        optimizer = base.optimizer if base.optimizer in self.optimizers else next(iter(self.optimizers))
        common: dict[str, Any] = {"optimizer": optimizer}
        for name, domain in self.optimizers[optimizer].items():
            common[f"{optimizer}.{name}"] = _clamp(domain, base_values[name])
        for name, domain in self.train.items():
            common[name] = _clamp(domain, base_values[name])
        points = []
        for name, space in self.families.items():
            defaults = self.defaults.get(name, {})
            point = {"family": name}
            point.update({f"{name}.{k}": _clamp(d, defaults[k]) for k, d in space.items() if k in defaults})
            point.update(common)
            points.append({k: v for k, v in point.items() if v is not None})
        return points

    def optuna_point(self, point: dict[str, Any]) -> dict[str, Any]:
        """`point` as Optuna stores it: choices that are not plain values by index."""
        domains = {"family": Choice(list(self.families)), "optimizer": Choice(list(self.optimizers))}
        for _, options in self.branches():
            for value, hparams in options.items():
                domains.update({f"{value}.{name}": d for name, d in hparams.items()})
        domains.update(self.train)
        out = {}
        for key, value in point.items():
            domain = domains[key]
            plain = not isinstance(domain, Choice) or _is_plain(domain.values)
            out[key] = value if plain else list(domain.values).index(value)
        return out


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


def train_trial(config: dict[str, Any], *, task: str, space: SearchSpace, train_data: Any, val_data: Any,
                base: TrainConfig, settings: Any, policy: Any, max_epochs: int) -> None:
    """One trial: build the chosen family, train it with the engine, report and checkpoint every epoch."""
    from models._registry import build
    from pipelines.engine import EpochResult, fit

    chosen = space.choice(config)
    cfg = base.updated(epochs=max_epochs, warmup_epochs=min(base.warmup_epochs, max_epochs - 1), **chosen.train)
    model = build(task, chosen.family, len(train_data.classes), train_data.in_channels, train_data.image_size,
                  **chosen.hparams)
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


def experiment_path(storage: str, name: str) -> str:
    """Where Ray Tune keeps the experiment `name` under `storage` (a folder or a URI)."""
    return f"{storage.rstrip('/')}/{name}"


def make_tuner(trainable: Any, space: SearchSpace, *, task: str, search: SearchParams,
               task_search: TaskSearchParams, base: TrainConfig, seed: int, storage: str, name: str,
               callbacks: list[tune.Callback], log: Callable[[str], None] = print) -> tune.Tuner:
    """A new Tuner, or the interrupted one at storage/name restored (finished trials are kept, not rerun)."""
    path = experiment_path(storage, name)
    if tune.Tuner.can_restore(path):
        log(f"resuming the search at {path}")
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    resources = {"cpu": search.cpus_per_trial, "gpu": search.gpus_per_trial}
    points = space.points(base)[:task_search.num_samples]
    algorithm = make_search_alg(search.algorithm, space, METRICS[task], points, search.max_concurrent, seed)
    tune_config = tune.TuneConfig(
        metric=METRICS[task], mode=MODE, search_alg=algorithm,
        scheduler=make_scheduler(search.scheduler, task_search.max_epochs, task_search.grace_period,
                                 search.reduction_factor, space),
        num_samples=task_search.num_samples, time_budget_s=task_search.time_budget_s,
        reuse_actors=True, trial_dirname_creator=trial_dirname,
    )
    run_config = tune.RunConfig(
        name=name, storage_path=storage, callbacks=callbacks, verbose=1,
        failure_config=tune.FailureConfig(max_failures=search.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
    )
    return tune.Tuner(tune.with_resources(trainable, resources),
                      param_space=space.ray_space() if search.algorithm == "random" else None,
                      tune_config=tune_config, run_config=run_config)


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


def trial_records(path: str, space: SearchSpace, metric: str, max_epochs: int) -> list[TrialRecord]:
    """Every trial of the experiment at `path`, read back from Ray Tune's saved state."""
    analysis = tune.ExperimentAnalysis(path, default_metric=metric, default_mode=MODE)
    records = []
    for trial in analysis.trials:
        if not trial.config or "family" not in trial.config:
            continue
        chosen = space.choice(trial.config)
        last = trial.last_result or {}
        epochs = int(last.get("epoch", 0) or 0)
        score = last.get(metric)
        error = None
        if trial.status == Trial.ERROR:
            status = "error"
            error = _error_line(trial)
        else:
            status = "completed" if epochs >= max_epochs else "stopped"
        usable = isinstance(score, (int, float)) and math.isfinite(score)
        records.append(TrialRecord(trial.trial_id, chosen.family, chosen.hparams, chosen.train, status,
                                   float(score) if usable else None, epochs, last.get("node_id"), error))
    return records


def _error_line(trial: Trial) -> str:
    """The last line of a failed trial's traceback (its exception), or a generic note."""
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "trial failed"


# Result keys Ray Tune fills in itself, and ours that are not metrics.
NOT_METRICS = {*AUTO_RESULT_KEYS, "epoch", "done", "trial_id", "experiment_tag", "should_checkpoint"}
TRIAL_TAG = "convforge.trial_id"
PARENT_TAG = "mlflow.parentRunId"


class MlflowTrialLogger(tune.Callback):
    """Logs each trial as an MLflow child run of the search's parent run, from the driver only.

    MLflow on SQLite wants one writer: trials never call MLflow, this callback (in the Tune
    driver) does. It is pickled with the experiment, so a resumed search keeps its parent run.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, space: SearchSpace,
                 metric: str, max_epochs: int) -> None:
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self.space, self.metric, self.max_epochs = space, metric, max_epochs
        self._runs: dict[str, str] = {}
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_runs": {}}

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def run_id(self, trial: Trial) -> str:
        """The trial's child run: found by its trial tag (a resumed search), else created with its params."""
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        found = find_child_run(self.client, self.experiment_id, self.parent_run_id, trial.trial_id)
        if found is None:
            from mlflow.entities import Param

            from pipelines.tracking import flatten

            chosen = self.space.choice(trial.config)
            run = self.client.create_run(
                self.experiment_id, run_name=f"{chosen.family}-{trial.trial_id}",
                tags={PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial.trial_id, "convforge.family": chosen.family})
            found = run.info.run_id
            values = flatten({"family": chosen.family, "model": chosen.hparams, "train": chosen.train})
            self.client.log_batch(found, params=[Param(k, str(v)) for k, v in values.items()])
        self._runs[trial.trial_id] = found
        return found

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.run_id(trial)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        from mlflow.entities import Metric, RunTag

        from pipelines.tracking import sanitize

        step = int(result.get("epoch") or result.get("training_iteration") or 0)
        now = int(1000 * result.get("timestamp", 0)) or None
        values = {k: v for k, v in result.items()
                  if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        values["epoch_time_s"] = result.get("time_this_iter_s", 0.0)
        metrics = [Metric(sanitize(k), float(v), now or 0, step) for k, v in values.items()]
        tags = [RunTag("convforge.node_id", str(result.get("node_id"))), RunTag("convforge.node_ip",
                                                                            str(result.get("node_ip")))]
        self.client.log_batch(self.run_id(trial), metrics=metrics, tags=tags)
        score = result.get(self.metric)
        print(f"trial {trial.trial_id} ({trial.config.get('family')}) epoch {step}/{self.max_epochs}: "
              f"{self.metric}={score if score is None else round(score, 4)}", flush=True)

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.client.set_tag(self.run_id(trial), "convforge.retries", str(trial.num_failures))
        print(f"trial {trial.trial_id} failed (attempt {trial.num_failures}); retrying", flush=True)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        epochs = int((trial.last_result or {}).get("epoch", 0) or 0)
        state = "completed" if epochs >= self.max_epochs else "stopped"
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, "convforge.trial_state", state)
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, "convforge.trial_state", "error")
        self.client.set_tag(run_id, "convforge.retries", str(max(0, trial.num_failures - 1)))
        self.client.set_tag(run_id, "convforge.error", _error_line(trial)[:5000])
        self.client.set_terminated(run_id, "FAILED")
        print(f"trial {trial.trial_id} failed for good: {_error_line(trial)}", flush=True)


def find_child_run(client: Any, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    """The run id of `trial_id`'s child run under `parent_run_id`, if one exists."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=1)
    return runs[0].info.run_id if runs else None
