"""`python -m pipelines.replay <mlflow-run-id | trial-id>`: retrain a recorded training run or search trial
and compare its metrics with the recorded ones.

A training run (the train stage's MLflow run) is rebuilt from its logged model's config.json (family,
hparams, training config, data hash, commit) and its params (seed, engine settings, augmentation policy),
retrained, and scored on val and test as the train and evaluate stages scored it. A search trial (its
MLflow child run, or the trial id that best.json and families.json name) is rebuilt from its `trial.json`
and its search's `search_inputs.json`, and retrained for the epochs it ran in the search. The workspace's
data hash and commit must be the recorded ones first (the error says which checkout restores them).

The metrics must be equal when the recorded run was deterministic and ran on the CPU (the replay then runs
on the CPU too; PyTorch promises bit-identical results only on the same versions, platform and thread
count); otherwise they must agree within `--tolerance` (absolute, default 0.02). The replay is a new MLflow
run in the original's experiment, tagged `convforge.replay_of`; the exit status is 1 when metrics differ.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import pipelines.runtime  # noqa: F401  (first: telemetry off before the stack is imported)
import torch
import yaml

from models import Choice, build
from models import family as registry_family
from pipelines import tracking
from pipelines.engine import EngineSettings, EpochResult, evaluate_report, fit
from pipelines.errors import ConvForgeError, stage_entry
from pipelines.geometry import data_geometry
from pipelines.params import PolicyParams, TrainConfig, load_params, validate
from pipelines.search_space import TrialChoice
from pipelines.tasks import PRIMARY, get_task
from pipelines.tracking import lineage
from pipelines.tracking.search_runs import SEARCH_INPUTS, TRIAL_CHOICE
from pipelines.transfer import load_pretrained, pretrained_source
from pipelines.tuner import TrialData, trial_model

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOLERANCE = 0.02


@dataclass(frozen=True)
class Replay:
    """A replay's outcome: the metrics the original recorded and the ones the retraining gave."""

    original: str  # the replayed run's id
    run_id: str  # the replay's own run
    exact: bool  # equal metrics expected (deterministic, CPU), else within `tolerance`
    tolerance: float
    recorded: dict[str, float]
    replayed: dict[str, float]

    def differences(self) -> dict[str, tuple[float, float]]:
        """The compared metrics that disagree: name -> (recorded, replayed)."""
        allowed = 0.0 if self.exact else self.tolerance
        return {key: (self.recorded[key], value) for key, value in self.replayed.items()
                if key in self.recorded and not same(self.recorded[key], value, allowed)}

    @property
    def compared(self) -> list[str]:
        return [key for key in self.replayed if key in self.recorded]

    @property
    def matches(self) -> bool:
        return bool(self.compared) and not self.differences()


def same(recorded: float, replayed: float, allowed: float) -> bool:
    """Equal within `allowed` (two NaNs are the same metric)."""
    return (math.isnan(recorded) and math.isnan(replayed)) or abs(recorded - replayed) <= allowed


def check_workspace(data_hash: str | None, commit: str | None, data_root: Path, log: Callable[[str], None]) -> None:
    """The workspace must hold the run's code and data; else one error that says how to check them out."""
    head, found = tracking.git_commit(PROJECT_ROOT), tracking.data_hash(data_root)
    wrong_code, wrong_data = bool(commit) and head != commit, bool(data_hash) and found != data_hash
    if wrong_code or wrong_data:
        what = [f"the code is at commit {head}, the run's was {commit}"] if wrong_code else []
        what += [f"{data_root} has data hash {found}, the run's was {data_hash}"] if wrong_data else []
        steps = [f"git checkout {commit}"] if wrong_code else []
        raise ConvForgeError(f"the workspace is not the run's: {'; '.join(what)}: run "
                             f"`{' && '.join([*steps, f'dvc checkout {data_root}'])}` first")
    if not commit:
        log("note: the run recorded no commit: the code is not checked")
    elif lineage.has_changes(PROJECT_ROOT):
        log(f"note: the work tree has uncommitted changes: the replay runs them, not commit {commit[:12]} alone")


def params_section(params: dict[str, str], section: str) -> dict[str, Any]:
    """The values of a run's flattened params `<section>.<key>` (strings) as YAML reads them."""
    prefix = f"{section}."
    return {key[len(prefix):]: (None if value == "" else yaml.safe_load(value))
            for key, value in params.items() if key.startswith(prefix)}


def data_root_of(task: str, data_root: Path | None) -> Path:
    """The prepared data a replay trains on: the given folder, else the workspace's."""
    return Path(data_root) if data_root is not None else PROJECT_ROOT / "data" / "prepared" / get_task(task).data


def recorded_on_cpu(run: lineage.RecordedRun) -> bool:
    """Whether a training run trained on the CPU: its engine.device param (the device as resolved), else (runs
    that predate it) the lack of MLflow's GPU system metrics, which a short run or a container without NVML lacks
    on a GPU as well."""
    device = run.params.get("engine.device")
    if device:
        return device == "cpu"
    return not any(key.startswith("system/gpu") for key in run.metrics)


def on_cpu(settings: EngineSettings, cpu_run: bool) -> tuple[EngineSettings, bool]:
    """The replay's settings and whether equal metrics are expected: a deterministic run recorded on the CPU is
    replayed on the CPU, whatever this machine has."""
    exact = settings.deterministic and cpu_run
    return (replace(settings, device="cpu") if exact else settings), exact


# TrainConfig keys added after a run may have been recorded, at the value that run trained with.
ADDED_KEYS = {"precise_bn": 0}


def recorded_config(values: dict[str, Any], prefix: str) -> TrainConfig:
    """A recorded run's TrainConfig, the keys it predates at `ADDED_KEYS`."""
    return validate(TrainConfig, {**ADDED_KEYS, **values}, prefix=prefix)


def replay_training(run: lineage.RecordedRun, data_root: Path | None, tolerance: float,
                    log: Callable[[str], None]) -> Replay:
    """Retrain a training run from its config.json and params; compare best val and test metrics."""
    config = lineage.logged_model_config(run.run_id)
    task, family = config["task"], config["family"]
    data_root = data_root_of(task, data_root)
    check_workspace(config.get("data_hash"), config.get("git_commit"), data_root, log)
    settings, exact = on_cpu(EngineSettings(**params_section(run.params, "engine")), recorded_on_cpu(run))
    policy = validate(PolicyParams, params_section(run.params, "policy"), prefix="policy")
    cfg = recorded_config(config["train"], "train")
    adapter = get_task(task)
    train, val, test = (adapter.load_split(data_root, split) for split in ("train", "val", "test"))
    torch.manual_seed(settings.seed)  # as the train stage seeds before it builds
    hparams = with_tuples(config["hparams"], registry_family(task, family).space)
    model = build(task, family, len(train.classes), train.in_channels, train.image_size, **hparams)
    load_pretrained(model, cfg.pretrained, task, PROJECT_ROOT, log)
    with lineage.replay_run(run, task, family) as replay_id:
        tracking.log_params({"kind": "train", "exact": exact, "tolerance": tolerance,
                             "threads": torch.get_num_threads(), "data_root": str(data_root)})
        result = fit(model, task, train, val, cfg, settings, policy=policy,
                     on_epoch=lambda r: tracking.log_metrics(r.metrics, step=r.epoch), log=log)
        replayed = {f"best_{PRIMARY[task]}": result.best_score, "best_epoch": float(result.best_epoch),
                    **evaluate_report(result.model, task, val, settings).flat("best_val_"),
                    **evaluate_report(result.model, task, test, settings).flat("test_")}
        return finish(run, replay_id, exact, tolerance, replayed)


class _Enough(Exception):
    """Raised from `fit`'s epoch callback once a replayed trial has trained the epochs it ran in the search."""


def trial_scores(task: str, choice: dict[str, Any], inputs: dict[str, Any], data_root: Path, epochs: int,
                 settings: EngineSettings, log: Callable[[str], None] | None,
                 on_epoch: Callable[[EpochResult], None] | None = None) -> list[EpochResult]:
    """Train a search trial as its trial ran (`pipelines.tuner.train_trial`) for `epochs` epochs; `on_epoch` sees
    each epoch's result as it ends."""
    hparams = with_tuples(choice["hparams"], registry_family(task, choice["family"]).space)
    chosen = TrialChoice(choice["family"], hparams, choice["train"])
    cfg = recorded_config(inputs["base"], "base").updated(**chosen.train)
    pretrained = {cfg.pretrained: pretrained_source(cfg.pretrained, task)} if cfg.pretrained else {}
    data = TrialData(str(Path(data_root).resolve()), inputs["train_subset"], inputs["seed"], {}, pretrained)
    train, val = data.load(task)
    # The search worked the detector geometry out once, from the same seeded subset.
    data = replace(data, geometry=data_geometry(train))
    model = trial_model(task, chosen, cfg, data, train)
    history: list[EpochResult] = []

    def record(result: EpochResult) -> None:
        history.append(result)
        if on_epoch is not None:
            on_epoch(result)
        if result.epoch >= epochs:
            raise _Enough

    try:
        fit(model, task, train, val, cfg, settings, policy=validate(PolicyParams, inputs["policy"], prefix="policy"),
            on_epoch=record, log=log)
    except _Enough:
        pass
    return history


def with_tuples(hparams: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters read back from JSON, with the tuple-valued choices of the family's space as tuples again."""
    def restore(key: str, value: Any) -> Any:
        domain = space.get(key)
        tuples = isinstance(domain, Choice) and any(isinstance(v, tuple) for v in domain.values)
        return tuple(value) if tuples and isinstance(value, list) else value

    return {key: restore(key, value) for key, value in hparams.items()}


def replay_trial(run: lineage.RecordedRun, data_root: Path | None, tolerance: float,
                 log: Callable[[str], None]) -> Replay:
    """Retrain a search trial from its trial.json and its search's inputs; compare its score at every epoch."""
    if not run.parent_id:
        raise ConvForgeError(f"run {run.run_id} is neither a training run nor a search trial")
    choice, inputs = lineage.run_json(run.run_id, TRIAL_CHOICE), lineage.run_json(run.parent_id, SEARCH_INPUTS)
    task, metric = inputs["task"], inputs["metric"]
    epochs = int(run.metrics.get("trial_epochs", 0))
    if epochs < 1:
        raise ConvForgeError(f"trial {run.tags.get(tracking.tags.TRIAL_ID)} recorded no finished epoch "
                             f"(state {run.tags.get(tracking.tags.TRIAL_STATE)}): nothing to replay")
    data_root = data_root_of(task, data_root)
    check_workspace(inputs["data_hash"], inputs["git_commit"], data_root, log)
    engine = inputs["engine"]
    settings, exact = on_cpu(EngineSettings(**engine), engine["device"] == "cpu" or not inputs.get("gpus_per_trial"))
    with lineage.replay_run(run, task, choice["family"]) as replay_id:
        tracking.log_params({"kind": "trial", "exact": exact, "tolerance": tolerance, "epochs": epochs,
                             "threads": settings.num_threads, "data_root": str(data_root)})
        history = trial_scores(task, choice, inputs, data_root, epochs, settings, log,
                               on_epoch=lambda result: tracking.log_metrics(result.metrics, step=result.epoch))
        replayed = {f"{metric}/epoch_{r.epoch}": r.metrics[metric] for r in history}
        replayed["trial_score"] = history[-1].metrics[metric]
        history_recorded = lineage.metric_history(run.run_id, metric)
        recorded = {f"{metric}/epoch_{step}": value for step, value in history_recorded.items() if 1 <= step <= epochs}
        return finish(run, replay_id, exact, tolerance, replayed, {**run.metrics, **recorded})


def finish(run: lineage.RecordedRun, replay_id: str, exact: bool, tolerance: float, replayed: dict[str, float],
           recorded: dict[str, float] | None = None) -> Replay:
    """The outcome, with its replayed metrics and the verdict logged into the replay run."""
    replayed = {tracking.sanitize(key): float(value) for key, value in replayed.items()}
    outcome = Replay(run.run_id, replay_id, exact, tolerance, recorded or run.metrics, replayed)
    if not outcome.compared:
        raise ConvForgeError(f"run {run.run_id} recorded none of the metrics the replay computes "
                             f"({', '.join(sorted(replayed)[:5])}, ...): was it evaluated?")
    gaps = [abs(outcome.recorded[key] - replayed[key]) for key in outcome.compared]
    tracking.log_metrics({**replayed, "replay_matches": float(outcome.matches),
                          "replay_max_abs_diff": max(gaps)}, step=0)
    return outcome


def replay(run_or_trial_id: str, data_root: Path | None = None, tolerance: float = DEFAULT_TOLERANCE,
           log: Callable[[str], None] = print) -> Replay:
    """Replay the training run or search trial `run_or_trial_id` (an MLflow run id or a trial id)."""
    run = lineage.recorded_run(run_or_trial_id)
    if run.tags.get(tracking.tags.STAGE) == "train":
        return replay_training(run, data_root, tolerance, log)
    return replay_trial(run, data_root, tolerance, log)


def report(outcome: Replay) -> str:
    """The comparison as lines: the verdict, then every metric that differs."""
    rule = "equal" if outcome.exact else f"within {outcome.tolerance:g}"
    differences = outcome.differences()
    head = (f"replay {outcome.run_id} of run {outcome.original}: {len(outcome.compared)} metrics compared ({rule}), "
            + ("all match" if outcome.matches else f"{len(differences)} differ"))
    return "\n".join([head, *(f"  {key}: recorded {old!r}, replayed {new!r}"
                              for key, (old, new) in sorted(differences.items()))])


@stage_entry
def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="an MLflow run id (a training run or a search trial's run) or a search trial id")
    parser.add_argument("--data", type=Path, default=None,
                        help="the prepared data folder (default: the workspace's data/prepared/<the task's data>)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest absolute difference allowed when equal metrics are not expected")
    args = parser.parse_args(sys.argv[1:])
    params = load_params(PROJECT_ROOT / "params.yaml")
    tracking.configure(params.mlflow)
    outcome = replay(args.run, args.data, args.tolerance)
    print(report(outcome))
    if not outcome.matches:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
