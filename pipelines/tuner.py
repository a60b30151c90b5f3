"""Ray Tune wiring of the search: Ray itself, schedulers, the search algorithm, the trial, the Tuner,
and the trials read back from Ray's saved state.

Trials are maximized on their task's primary validation metric and report once per epoch with a
checkpoint, which is what schedulers, retries and resuming need.

With `search.budget: epochs` no decision depends on which trial finishes first: trial k starts only
once the trials `max_concurrent` or more places before it have finished (`InOrder`), it is drawn from
their results alone by an Optuna sampler seeded by (seed, k) (`PerTrialSeed`; the trials in between
count as running, Optuna's constant liar), and it is halved against them alone (`OrderedHalving`, ASHA's
rule at ASHA's rungs). Or, with `scheduler: sha`, every trial is drawn up front by its own seeded sampler
and each rung is decided once all of them hold their score there (`PromotingHalving`, synchronous).
Ray's own pieces decide by timing here: ASHA compares a trial with whichever trials reached the rung
before it; HyperBand halves a bracket when the trials it holds so far reach the milestone, which with
fewer concurrent trials than a bracket holds is a matter of timing; a batching ConcurrencyLimiter is
order-independent but stops all but one idle actor at each batch's end (Tune caches one), so every batch
starts its trials in new worker processes.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import (ASHAScheduler, FIFOScheduler, HyperBandScheduler, PopulationBasedTraining,
                                 TrialScheduler)
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm, Searcher
from ray.tune.search.optuna import OptunaSearch

from pipelines import cluster, runtime, scratch, tracking
from pipelines.engine import EngineSettings, EpochResult, fit
from pipelines.errors import ConvForgeError
from pipelines.params import PolicyParams, SearchParams, TaskSearchParams, TrainConfig
from pipelines.recipe import run_config, run_model
from pipelines.search_space import SearchSpace, TrialChoice

MODE = "max"
# Schedulers that pause trials at a rung and resume them from their checkpoints (PromotingHalving).
PAUSING = ("asha_promote", "sha")

# Read by the Tune driver. Every epoch's checkpoint forces an experiment snapshot (num_to_keep is set),
# which is what resuming needs: Ray's warning that snapshots are frequent is noise for short epochs.
# Ctrl-C stops the stage (Tune's own handler would return as if the search had ended).
# RAY_AIR_NEW_OUTPUT=0 with `verbose=0` silences Tune's reporter (the new one prints its configuration box even
# when silent); pipelines/search_progress.py prints a line per trial result instead.
TUNE_ENV = {"TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0", "TUNE_DISABLE_SIGINT_HANDLER": "1",
            "RAY_AIR_NEW_OUTPUT": "0"}
# Each report carries the trial's score of every epoch so far (OrderedHalving reads earlier trials' rungs from
# their last report), and the checkpoint keeps them in this file for a restored trial.
SCORES = "scores"
SCORES_FILE = "scores.json"
TRIAL_SCRATCH = "convforge-trial-"  # a trial's checkpoint folder in the temp folder (pipelines/scratch.py)
RESUMING = "resuming the search at "  # the log's line when a stored search is restored (bench/repro_times.py)


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
    # budget epochs: each trial drawn and halved (by reduction_factor) only after the trials this many places
    # before it have finished; None: as trials finish
    window: int | None = None
    reduction_factor: int = 2
    scheduler: str = "asha"  # search.scheduler

    @property
    def path(self) -> str:
        """Where Ray Tune keeps this experiment."""
        return f"{self.storage.rstrip('/')}/{self.name}"


def trial_base(cfg: TrainConfig, max_epochs: int) -> TrainConfig:
    """`cfg` as a trial trains it: `max_epochs` epochs, warm-up cut to fit (as the final training's, `run_config`)."""
    return run_config(cfg, max_epochs)


def rungs(max_epochs: int, grace_period: int, reduction_factor: int) -> list[int]:
    """ASHA's rungs (Li et al. 2020): grace_period * reduction_factor^k epochs, below max_epochs."""
    out, epoch = [], min(grace_period, max_epochs)
    while epoch < max_epochs:
        out.append(epoch)
        epoch *= reduction_factor
    return out


def halving_stops(scores: list[float], earlier: list[list[float]], rung_epochs: list[int],
                  reduction_factor: int) -> bool:
    """ASHA's rule at a trial's latest epoch, when it is a rung: stop when its score is below the (1 - 1/rf)
    quantile of the rung's scores of `earlier` trials (their every epoch's score) that reached the rung."""
    epoch = len(scores)
    if epoch not in rung_epochs:
        return False
    recorded = [history[epoch - 1] for history in earlier if len(history) >= epoch]
    return bool(recorded) and scores[-1] < float(np.nanpercentile(recorded, (1 - 1 / reduction_factor) * 100))


def trial_index(trial: Trial) -> int:
    """A trial's 0-based place in the order the search drew it (Tune's experiment tag starts with its count)."""
    return int(re.match(r"\d+", trial.experiment_tag).group()) - 1


class OrderedHalving(FIFOScheduler):
    """Successive halving at ASHA's rungs, a trial judged against the trials `window` or more places before it.

    `InOrder` starts a trial only once those have finished, so their rung scores are final and no decision
    depends on finishing order. Stateless (Tune does not save a scheduler's state): the earlier trials'
    scores come from their last reports, so a restored search decides alike.
    """

    def __init__(self, rung_epochs: list[int], reduction_factor: int, window: int):
        super().__init__()
        self.rung_epochs, self.reduction_factor, self.window = rung_epochs, reduction_factor, window

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        last = trial_index(trial) - self.window
        earlier = [other.last_result.get(SCORES, []) for other in tune_controller.get_trials()
                   if trial_index(other) <= last and other.last_result]
        stop = halving_stops(result.get(SCORES, []), earlier, self.rung_epochs, self.reduction_factor)
        return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE


def rung_top(histories: dict[str, list[float]], epoch: int, reduction_factor: int, keep_one: bool = False) -> list[str]:
    """The top floor(n / reduction_factor) of the n scores rung `epoch` holds (at least one with `keep_one`),
    best first. `histories` maps each trial, in the order drawn (it breaks ties), to its score after every
    epoch; a trial holds the rung's score once it has trained `epoch` epochs. A NaN score ranks last."""
    rung = {trial: history[epoch - 1] for trial, history in histories.items() if len(history) >= epoch}
    ranked = sorted(rung, key=lambda trial: -rung[trial] if math.isfinite(rung[trial]) else math.inf)
    return ranked[:max(len(rung) // reduction_factor, 1 if keep_one else 0)]


def promotable(histories: dict[str, list[float]], epoch: int, reduction_factor: int, waiting: set[str],
               keep_one: bool = False) -> list[str]:
    """ASHA's promotions at one rung (Li et al. 2020, Algorithm 2): the trials of `rung_top` that are
    `waiting` there (have trained no more than `epoch` epochs), best first."""
    return [trial for trial in rung_top(histories, epoch, reduction_factor, keep_one)
            if trial in waiting and len(histories[trial]) == epoch]


class PromotingHalving(FIFOScheduler):
    """ASHA as Li et al. 2020 define it (Algorithm 2): a trial pauses at each rung, and a paused trial resumes
    (is promoted) once its score ranks in the top 1/reduction_factor of the scores its rung holds; a free slot
    takes a promotion (the highest rung's first) before it starts a new trial, and once every trial is drawn
    and none runs or can be promoted, the paused ones stop.

    Ray's ASHAScheduler is the stopping variant: it lets a trial on when its score clears the quantile of the
    scores recorded so far, so the first trials at a rung always go on. Here none goes on before the rung has
    `reduction_factor` scores, and a trial left behind by early luck can still be promoted later: fewer
    trial-epochs for the same best (bench/tune_efficiency.py). Trials need checkpoints (they keep one per
    epoch) and decisions depend on which trial reaches a rung first, as with Ray's ASHA. Stateless: the rung
    scores come from the trials' last reports.

    `synchronous`: successive halving (Li et al. 2020, Algorithm 1). A rung is decided once every trial is
    drawn and each one still live has its score there (or was left out at a lower rung): its top
    1/reduction_factor (at least one) go on and the rest stop. No promotion rests on a partial rung, and no
    decision depends on which trial reaches a rung first.
    """

    def __init__(self, rung_epochs: list[int], reduction_factor: int, num_samples: int, synchronous: bool = False):
        super().__init__()
        self.rung_epochs, self.reduction_factor, self.num_samples = rung_epochs, reduction_factor, num_samples
        self.synchronous = synchronous

    @staticmethod
    def histories(trials: list[Trial]) -> dict[str, list[float]]:
        return {trial.trial_id: (trial.last_result or {}).get(SCORES, []) for trial in trials}

    def decided(self, histories: dict[str, list[float]], live: set[str], epoch: int) -> bool:
        """Whether rung `epoch` takes its decisions now: asynchronous, always; synchronous, once every trial is
        drawn and each `live` one holds its score there or was left out at a lower, decided rung."""
        if not self.synchronous:
            return True
        if len(histories) < self.num_samples:
            return False
        return all(len(histories[trial]) >= epoch or self.left_out(histories, live, trial) for trial in live)

    def left_out(self, histories: dict[str, list[float]], live: set[str], trial: str) -> bool:
        """Whether `trial` waits at a decided rung below its top (synchronous)."""
        epoch = len(histories[trial])
        return (epoch in self.rung_epochs and self.decided(histories, live, epoch)
                and trial not in rung_top(histories, epoch, self.reduction_factor, keep_one=True))

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        scores = result.get(SCORES, [])
        if len(scores) not in self.rung_epochs:
            return TrialScheduler.CONTINUE
        trials = tune_controller.get_trials()
        histories = {**self.histories(trials), trial.trial_id: scores}
        if not self.decided(histories, live_ids(trials) | {trial.trial_id}, len(scores)):
            return TrialScheduler.PAUSE
        waiting = set(self.waiting(trials)) | {trial.trial_id}
        due = promotable(histories, len(scores), self.reduction_factor, waiting, keep_one=self.synchronous)
        if trial.trial_id in due:
            return TrialScheduler.CONTINUE
        return TrialScheduler.STOP if self.synchronous else TrialScheduler.PAUSE

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        trials = tune_controller.get_trials()
        histories, live = self.histories(trials), live_ids(trials)
        waiting = self.waiting(trials)
        if self.synchronous:  # trials left out at a decided rung stop
            for trial_id in [t for t in waiting if self.left_out(histories, live, t)]:
                tune_controller.stop_trial(waiting.pop(trial_id))
        for epoch in reversed(self.rung_epochs):
            if self.decided(histories, live, epoch):
                due = promotable(histories, epoch, self.reduction_factor, set(waiting), keep_one=self.synchronous)
                if due:
                    return waiting[due[0]]
        for trial in trials:
            if trial.status == Trial.PENDING and trial.trial_id not in waiting:
                return trial
        if len(trials) >= self.num_samples and all(t.trial_id in waiting or t.status in (Trial.TERMINATED, Trial.ERROR)
                                                   for t in trials):
            for trial in waiting.values():  # the search's end: no promotion is left to come
                tune_controller.stop_trial(trial)
        return None

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        """A restored search requeues its paused trials as pending, with their checkpoints, and Tune starts
        pending trials by itself: one whose last score is at a rung goes back to waiting there instead, for
        this scheduler to promote or stop. (Tune files a trial under its status after this call: the restore test
        in tests/integration/test_promoting_halving.py fails if that changes.)"""
        if trial.status == Trial.PENDING and len((trial.last_result or {}).get(SCORES, [])) in self.rung_epochs:
            trial.set_status(Trial.PAUSED)

    @staticmethod
    def waiting(trials: list[Trial]) -> dict[str, Trial]:
        """The trials that wait at a rung (paused there)."""
        return {trial.trial_id: trial for trial in trials if trial.status == Trial.PAUSED}


def live_ids(trials: list[Trial]) -> set[str]:
    """The trials that may still train: pending, running or paused."""
    return {trial.trial_id for trial in trials if trial.status in (Trial.PENDING, Trial.RUNNING, Trial.PAUSED)}


def make_scheduler(kind: str, max_epochs: int, grace_period: int, reduction_factor: int,
                   space: SearchSpace, window: int | None = None, num_samples: int | None = None) -> TrialScheduler:
    """ASHA (Li et al. 2020; in trial order with a `window`, see `OrderedHalving`; with promotions as the paper
    has it, `PromotingHalving`), synchronous successive halving (sha, `PromotingHalving` too; both need the
    search's `num_samples`), HyperBand (Li et al. 2018) or PBT (Jaderberg et al. 2017), stepping per epoch."""
    if kind == "asha" and window:
        return OrderedHalving(rungs(max_epochs, grace_period, reduction_factor), reduction_factor, window)
    if kind in ("asha_promote", "sha"):
        if not num_samples:
            raise ConvForgeError(f"scheduler {kind} needs the search's num_samples")
        return PromotingHalving(rungs(max_epochs, grace_period, reduction_factor), reduction_factor, num_samples,
                                synchronous=kind == "sha")
    if kind == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=max_epochs,
                             grace_period=min(grace_period, max_epochs), reduction_factor=reduction_factor)
    if kind == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", max_t=max_epochs,
                                  reduction_factor=reduction_factor)
    if kind == "pbt":
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=1,
                                       hyperparam_mutations=space.mutations())
    raise ConvForgeError(f"search.scheduler: expected one of asha, asha_promote, sha, hyperband, pbt, got {kind!r}")


def tpe_sampler(seed: int, n_startup_trials: int) -> optuna.samplers.TPESampler:
    """Optuna's TPE (Bergstra et al. 2011) over the conditional space, modelling it from `n_startup_trials` on."""
    # `group` fits each conditional branch on the trials that have it; multivariate/group are marked experimental.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, multivariate=True, group=True)


class PerTrialSeed(optuna.samplers.BaseSampler):
    """Optuna sampling in which trial n draws from its own sampler, `factory(seed of (seed, n))`: its values
    depend on its index and the study's finished trials, never on how many draws came before it."""

    def __init__(self, factory: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self.factory, self.seed = factory, seed
        self._current: tuple[int, optuna.samplers.BaseSampler] | None = None

    def sampler(self, trial: Any) -> optuna.samplers.BaseSampler:
        """The sampler of `trial` (by its number), made when the trial starts."""
        if self._current is None or self._current[0] != trial.number:
            seed = int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0])
            self._current = (trial.number, self.factory(seed))
        return self._current[1]

    def before_trial(self, study: Any, trial: Any) -> None:
        self.sampler(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return self.sampler(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
        return self.sampler(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        return self.sampler(trial).sample_independent(study, trial, param_name, param_distribution)


class InOrder(Searcher):
    """Trial k is drawn only once trials 0..k-window have finished, and the searcher is told their results
    in trial order, no others: what it draws depends on the trial's index, never on which trial finished first.

    Ray's ConcurrencyLimiter in batch mode gives the same independence, but every batch then starts in new
    worker processes (see the module's docstring); here a slot waits only when a trial ends before one
    `window` places earlier.
    """

    def __init__(self, searcher: Searcher, window: int):
        self.searcher, self.window = searcher, window
        self.index: dict[str, int] = {}  # trial id -> its place in the order drawn
        self.finished: dict[int, tuple[str, dict | None, bool]] = {}  # finished, not yet told: id, result, error
        self.told = 0  # trials 0..told-1 are told
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict | None:
        while self.told <= len(self.index) - self.window:
            if self.told not in self.finished:
                return None  # Tune asks again once a trial finishes
            told_id, result, error = self.finished.pop(self.told)
            self.searcher.on_trial_complete(told_id, result=result, error=error)
            self.told += 1
        config = self.searcher.suggest(trial_id)
        if config not in (None, Searcher.FINISHED):
            self.index[trial_id] = len(self.index)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.index:
            self.finished[self.index[trial_id]] = (trial_id, result, error)
        else:  # not drawn here (Tune restored it from a state older than this searcher's): nothing to order
            self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "searcher"}

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)


def make_search_alg(algorithm: str, space: SearchSpace, metric: str, points: list[dict[str, Any]],
                    max_concurrent: int, seed: int, in_order: bool = False) -> SearchAlgorithm | Searcher:
    """Optuna TPE over the conditional space (behind a ConcurrencyLimiter), or Ray's seeded random search.

    `in_order` (budget epochs): trials drawn `InOrder` with a window of `max_concurrent`, each from a sampler
    seeded by its index (`PerTrialSeed`; random search is Optuna's random sampler then).
    """
    if algorithm not in ("optuna", "random"):
        raise ConvForgeError(f"search.algorithm: expected optuna or random, got {algorithm!r}")
    # TPE models the space from the families' starting points on (its default waits for 10 trials).
    startup = max(2, len(points))
    if in_order:
        factory = functools.partial(tpe_sampler, n_startup_trials=startup) if algorithm == "optuna" else (
            optuna.samplers.RandomSampler)
        sampler = PerTrialSeed(factory, seed)
    elif algorithm == "optuna":
        sampler = tpe_sampler(seed, startup)
    else:
        return BasicVariantGenerator(points_to_evaluate=points, max_concurrent=max_concurrent, random_state=seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study created
    searcher = OptunaSearch(space=space, metric=metric, mode=MODE, sampler=sampler,
                            points_to_evaluate=[space.optuna_point(p) for p in points])
    return ConcurrencyLimiter(InOrder(searcher, max_concurrent) if in_order else searcher, max_concurrent)


def init_ray(address: str | None = None, num_cpus: int | None = None, log: Callable[[str], None] = print) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray; either way workers import the project.

    Returns whether this call started or joined Ray (False when the process was already connected).
    """
    for key, value in TUNE_ENV.items():
        os.environ.setdefault(key, value)
    return cluster.connect(address, num_cpus, log)


def trial_model(task: str, chosen: TrialChoice, cfg: TrainConfig, data: TrialData, train_data: Any) -> Any:
    """The model a trial trains, built by the final training's `run_model`: seeded (so its initial weights do not
    depend on what its reused actor ran before), the detector geometry of its data, the trunk from `pretrained`
    (quietly: the search prints a line per trial, and the final training says how its trunk loaded)."""
    source = data.pretrained[cfg.pretrained] if cfg.pretrained else None
    return run_model(task, chosen.family, chosen.hparams, train_data, data.seed, data.geometry, source)[1]


def train_trial(config: dict[str, Any], *, task: str, space: SearchSpace, data: TrialData,
                base: TrainConfig, settings: EngineSettings, policy: PolicyParams) -> None:
    """One trial: load its data from `data`'s paths, build the chosen family, train it with the engine
    (`base` with the trial's choice), report and checkpoint every epoch."""
    train_data, val_data = data.load(task)
    chosen = space.choice(config)
    cfg = base.updated(**chosen.train)
    model = trial_model(task, chosen, cfg, data, train_data)
    node_id = ray.get_runtime_context().get_node_id()
    device = runtime.device_line(settings.choice(), runtime.probe()).removeprefix("device: ")  # the run's tag
    # Ray logs "Checkpoint successfully created" at INFO for every epoch of every trial.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cluster.quiet_sigterm_exit()
    with scratch.folder(TRIAL_SCRATCH) as work:
        checkpoint_dir = work / "engine"
        checkpoint_dir.mkdir()
        restored = tune.get_checkpoint()
        if restored is not None:  # a retried, resumed or PBT-exploited trial goes on from its last epoch
            restored.to_directory(str(checkpoint_dir))
        scores_path = checkpoint_dir / SCORES_FILE
        scores = json.loads(scores_path.read_text()) if scores_path.is_file() else []

        def on_epoch(result: EpochResult) -> None:
            scores.append(result.score)
            scores_path.write_text(json.dumps(scores))
            metrics = {key: value for key, value in result.metrics.items() if isinstance(value, (int, float))}
            tune.report({**metrics, "score": result.score, "epoch": result.epoch, "node_id": node_id,
                         "device": device, SCORES: list(scores)},
                        checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

        # Silent: the driver prints each reported epoch once (pipelines/search_progress.py); a trial's own
        # prints would reach the terminal a second time through Ray's log forwarding.
        fit(model, task, train_data, val_data, cfg, settings, policy=policy, checkpoint_dir=checkpoint_dir,
            on_epoch=on_epoch, log=None)


def trial_dirname(trial: Trial) -> str:
    """Short trial folder names (Ray's default spells out the whole config)."""
    return f"trial_{trial.trial_id}"


def make_tuner(trainable: Any, experiment: Experiment, search: SearchParams, seed: int,
               callbacks: list[tune.Callback], log: Callable[[str], None] = print) -> tune.Tuner:
    """A new Tuner, or the interrupted one at the experiment's path restored (finished trials are kept, not rerun)."""
    if tune.Tuner.can_restore(experiment.path):
        log(f"{RESUMING}{experiment.path}")
        return tune.Tuner.restore(experiment.path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    space, budget, in_order = experiment.space, experiment.budget, experiment.window is not None
    points = space.points(experiment.base)[:budget.num_samples]
    # A searcher counts paused trials as running: under asha_promote and sha it draws every trial up front (TPE
    # then models none of them), while the trials' resources still run max_concurrent at a time.
    drawn = budget.num_samples if search.scheduler in PAUSING else search.max_concurrent
    tune_config = tune.TuneConfig(
        metric=experiment.metric, mode=MODE,
        search_alg=make_search_alg(search.algorithm, space, experiment.metric, points, drawn, seed, in_order),
        scheduler=make_scheduler(search.scheduler, budget.max_epochs, budget.grace_period, search.reduction_factor,
                                 space, experiment.window, budget.num_samples),
        # budget time: the budget; budget epochs: a guard (the search says it is not reproducible when it fires)
        num_samples=budget.num_samples, time_budget_s=budget.time_budget_s,
        reuse_actors=True, trial_dirname_creator=trial_dirname,
    )
    run_config = tune.RunConfig(
        name=experiment.name, storage_path=experiment.storage, callbacks=callbacks, verbose=0,
        failure_config=tune.FailureConfig(max_failures=search.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
    )
    # `auto` shares this machine (or the cluster) between max_concurrent trials; a GPU share makes Ray give the
    # trial its GPU (with none it hides them all: CUDA_VISIBLE_DEVICES="")
    cpus, gpus = cluster.trial_resources(search)
    resources = {"cpu": cpus, "gpu": gpus}
    return tune.Tuner(tune.with_resources(trainable, resources),
                      param_space=space.ray_space() if search.algorithm == "random" and not in_order else None,
                      tune_config=tune_config, run_config=run_config)


def run_trials(experiment: Experiment, search: SearchParams, seed: int, settings: EngineSettings,
               policy: PolicyParams, callbacks: list[tune.Callback], log: Callable[[str], None] = print,
               trial: Callable[..., None] = train_trial) -> None:
    """Fit the experiment's Tuner (new or restored) on the Ray at `search.ray_address`, else a local one.
    `trial` is the trainable, called as `train_trial` is (a test may wrap it)."""
    started_ray = init_ray(search.ray_address, log=log)
    try:
        cluster.require_shared(f"search {experiment.task}", tracking.tracking_uri(), experiment.storage,
                               search.ray_address)
        # Trials get paths, not arrays: each loads its splits from disk (memory-mapped when large), so the
        # object store (512 MiB locally) carries only the small arguments.
        trainable = tune.with_parameters(trial, task=experiment.task, space=experiment.space,
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
    index: int  # its place in the order the search drew it
    family: str
    hparams: dict[str, Any]
    train: dict[str, Any]
    status: str  # completed | stopped (by the scheduler; budget time: or the time budget) | timed_out | error
    score: float | None  # the score of its last epoch
    epochs: int
    node_id: str | None
    error: str | None


def trial_status(trial: Trial, experiment: Experiment, trials: list[Trial]) -> str:
    """completed, error, stopped (halved; budget time: or out of time) or timed_out (budget epochs: the guard
    stopped it where halving would not have). `trials`: the experiment's, in the order drawn."""
    last = trial.last_result or {}
    epochs, budget = int(last.get("epoch", 0) or 0), experiment.budget
    if trial.status == Trial.ERROR:
        return "error"
    if epochs >= budget.max_epochs:
        return "completed"
    if experiment.window is None:
        return "stopped"
    rung_epochs = rungs(budget.max_epochs, budget.grace_period, experiment.reduction_factor)
    histories = PromotingHalving.histories(trials)
    if experiment.scheduler == "sha":  # left out of its rung's top
        halved = epochs in rung_epochs and trial.trial_id not in rung_top(histories, epochs,
                                                                          experiment.reduction_factor, keep_one=True)
    else:  # below the quantile of the trials `window` or more places before it
        earlier = [histories[t.trial_id] for t in trials if trial_index(t) <= trial_index(trial) - experiment.window]
        halved = halving_stops(last.get(SCORES, []), earlier, rung_epochs, experiment.reduction_factor)
    return "stopped" if halved else "timed_out"


def trial_records(experiment: Experiment) -> list[TrialRecord]:
    """Every trial of the experiment in the order the search drew it, read back from Ray Tune's saved state."""
    metric = experiment.metric
    analysis = tune.ExperimentAnalysis(experiment.path, default_metric=metric, default_mode=MODE)
    trials = sorted((t for t in analysis.trials if t.config and "family" in t.config), key=trial_index)
    records = []
    for trial in trials:
        chosen = experiment.space.choice(trial.config)
        last = trial.last_result or {}
        status = trial_status(trial, experiment, trials)
        score = last.get(metric)
        usable = isinstance(score, (int, float)) and math.isfinite(score)
        records.append(TrialRecord(trial.trial_id, trial_index(trial), chosen.family, chosen.hparams, chosen.train,
                                   status, float(score) if usable else None, int(last.get("epoch", 0) or 0),
                                   last.get("node_id"), error_line(trial) if status == "error" else None))
    return records


def error_line(trial: Trial) -> str:
    """The last line of a failed trial's traceback (its exception), or a generic note."""
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "trial failed"
