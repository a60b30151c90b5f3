"""The promote stage's gate: a trained model becomes the `champion` (the model the package stage serves)
only when its test metrics pass `promote.<task>` of params.yaml.

The gate: every `min` bound (metric >= bound) and `max` bound (metric <= bound) holds, and `metric`
beats the current champion's by more than 0 and by at least `margin`, when the champion was tested on
the same test data (the SHA-256 of `data/prepared/<data>/test`); a champion tested on other data is
not comparable and gives way to any model that passes the bounds. `run_promotion` applies it to the
train stage's newest registered version, moves the registry's alias when it passes, and writes:

- `reports/promotion/<task>.json`: `passed`, `promoted`, the one-line `verdict`, each check with its
  value, operator and bound, the candidate, the previous champion and the champion now;
- `artifacts/champion/<task>/`: the champion's model folder (model.safetensors, config.json,
  history.json), copied from the new model when it was promoted, else downloaded from its registered
  version, its weights checked against the SHA-256 the registry recorded; and registration.json
  (`registered_model`, `registered_version`, `registered_alias`). With no champion at all, only
  registration.json, its version null: the package stage then stops, naming the failed checks.

A failed gate is a result, not an error: the champion stays, and the summary says why.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import pipelines.runtime as runtime
from models import _checkpoint as checkpoint
from pipelines import tracking
from pipelines.errors import ConvForgeError
from pipelines.params import Params, PromoteGate
from pipelines.tasks import get_task

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = (checkpoint.WEIGHTS, checkpoint.CONFIG, "history.json")  # what the logged model holds too
PREFIX = tracking.tags.TEST_METRIC_PREFIX
TOLERANCE = 1e-9  # test metrics are rounded to 6 decimals: a margin met exactly is met
FAILS = {">=": "<", "<=": ">", ">": "<="}  # how a failed check reads


@dataclass(frozen=True)
class Check:
    """One condition of the gate: `value op bound`."""

    name: str
    metric: str
    value: float
    op: str
    bound: float
    passed: bool


@dataclass(frozen=True)
class Candidate:
    """The train stage's newest model: its registered version and its test results."""

    version: tracking.RegisteredVersion
    weights_sha256: str
    test_data_hash: str
    metrics: dict[str, float]


def read_metrics(path: Path, task: str) -> dict[str, float]:
    """The evaluate stage's test metrics of `task`."""
    try:
        metrics = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConvForgeError(f"{path} not found: run `dvc repro evaluate@{task}` first") from None
    except json.JSONDecodeError as exc:
        raise ConvForgeError(f"{path}: not valid JSON ({exc})") from None
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def check_names(gate: PromoteGate, metrics: dict[str, float], task: str, source: Path) -> None:
    """Every metric the gate names is one the evaluation wrote (a typo is an error, not a failed gate)."""
    named = [(f"promote.{task}.metric", gate.metric)]
    named += [(f"promote.{task}.{side}", name) for side in ("min", "max") for name in getattr(gate, side)]
    for key, name in named:
        if f"{PREFIX}{name}" not in metrics:
            known = ", ".join(sorted(k.removeprefix(PREFIX) for k in metrics))
            raise ConvForgeError(f"{key}: no test metric {name!r} in {source} (it has {known})")


def bound_checks(gate: PromoteGate, metrics: dict[str, float]) -> list[Check]:
    """The gate's `min` and `max` bounds on the candidate's test metrics."""
    checks = []
    for side, op in (("min", ">="), ("max", "<=")):
        for name, bound in getattr(gate, side).items():
            value = metrics[f"{PREFIX}{name}"]
            passed = value >= bound - TOLERANCE if op == ">=" else value <= bound + TOLERANCE
            checks.append(Check(f"{side} {name}", f"{PREFIX}{name}", value, op, bound, passed))
    return checks


def comparable(champion: tracking.RegisteredVersion | None, candidate: Candidate, metric: str) -> bool:
    """Whether the champion is another version tested on the candidate's test data, with `metric` recorded."""
    return (champion is not None and champion.version != candidate.version.version
            and champion.tags.get(tracking.tags.VERSION_TEST_DATA_HASH) == candidate.test_data_hash
            and champion.number(metric) is not None)


def champion_check(gate: PromoteGate, candidate: Candidate, champion: tracking.RegisteredVersion | None
                   ) -> Check | None:
    """`metric` against the champion's on the same test data plus `margin`; None when there is nothing to beat."""
    metric, margin = f"{PREFIX}{gate.metric}", gate.margin
    if not comparable(champion, candidate, metric):
        return None
    best, value = champion.number(metric), candidate.metrics[metric]
    passed = value > best and value - best >= margin - TOLERANCE
    return Check(f"beats champion v{champion.version} on {gate.metric}", metric, value, ">" if margin == 0 else ">=",
                 best + margin, passed)


def verdict(name: str, candidate: int, promoted: bool, failed: list[Check], champion: int | None) -> str:
    """The one line the summary prints: what happened to the candidate and why, and which version is champion."""
    reasons = ", ".join(f"{c.name}: {c.value:.4g} {FAILS[c.op]} {c.bound:.4g}" for c in failed)
    if promoted:
        return f"{name} v{candidate} promoted to champion"
    if champion == candidate:
        return f"{name} v{candidate} is the champion" + (f", but fails the gate now ({reasons})" if failed else "")
    stays = f"the champion stays v{champion}" if champion is not None else "no champion: nothing to serve"
    return f"{name} v{candidate} not promoted ({reasons}); {stays}"


def read_candidate(model_dir: Path, metrics: dict[str, float], test_hash: str, task: str) -> Candidate:
    """The registered version of the model in `model_dir` (config.json + registration.json)."""
    config = checkpoint.read_config(model_dir)
    registration = checkpoint.read_registration(model_dir)
    name, number = registration.get("registered_model"), registration.get("registered_version")
    if not name or number is None:
        raise ConvForgeError(f"{model_dir}: the model was never registered (no registration.json); "
                             f"rerun `dvc repro train@{task}`")
    version = tracking.model_version(name, number)
    if version.run_id != config.get("mlflow_run_id"):
        raise ConvForgeError(f"{model_dir}: registered {name} v{number} belongs to run {version.run_id}, "
                             f"not to this model's run {config.get('mlflow_run_id')} (DVC's run-cache can restore a "
                             f"training another MLflow store registered): rerun `dvc repro --force train@{task}`")
    return Candidate(version, str(config.get("weights_sha256") or ""), test_hash, metrics)


def record(candidate: Candidate, passed: bool, line: str, champion: bool) -> None:
    """The gate's result on the candidate's registered version (tags, description) and on its training run."""
    version = candidate.version
    tracking.tag_version(version.name, version.version,
                         {**candidate.metrics, tracking.tags.VERSION_TEST_DATA_HASH: candidate.test_data_hash,
                          tracking.tags.VERSION_GATE: "passed" if passed else "failed"}, description=line)
    if version.run_id and tracking.run_exists(version.run_id):
        tracking.set_tags({tracking.tags.CHAMPION: champion, tracking.tags.PROMOTION: line}, run_id=version.run_id)


def checked_copy(source: Path, staging: Path, expected_sha256: str, origin: str) -> None:
    """The model files of `source` into `staging`, the weights' SHA-256 checked against `expected_sha256`."""
    for name in MODEL_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, staging / name)
    weights = staging / checkpoint.WEIGHTS
    if not weights.is_file():
        raise ConvForgeError(f"{origin}: no {checkpoint.WEIGHTS}")
    sha = runtime.sha256_file(weights)
    recorded = str(checkpoint.read_config(staging).get("weights_sha256") or "")
    for wanted, where in ((expected_sha256, "the registry"), (recorded, "its config.json")):
        if wanted and wanted != sha:
            raise ConvForgeError(f"{origin}: weights SHA-256 {sha[:12]} differs from {where}'s {wanted[:12]}; "
                                 "the champion's files were changed: retrain, or move the alias to a sound version")


def write_champion(out_dir: Path, champion: tracking.RegisteredVersion | None, candidate: Candidate,
                   model_dir: Path, name: str) -> None:
    """The champion's model folder, copied from `model_dir` when it is the candidate, else from the registry."""
    with runtime.atomic_dir(out_dir) as staging:
        if champion is not None:
            expected = champion.tags.get(tracking.tags.VERSION_WEIGHTS_SHA256, "")
            origin = f"registered model {name} v{champion.version}"
            if champion.version == candidate.version.version:
                checked_copy(Path(model_dir), staging, expected or candidate.weights_sha256, f"{model_dir} ({origin})")
            else:
                with tempfile.TemporaryDirectory(prefix="convforge-champion-") as scratch:
                    checked_copy(tracking.download_model_dir(name, champion.version, Path(scratch)), staging,
                                 expected, origin)
        runtime.write_json(staging / checkpoint.REGISTRATION, {
            "registered_model": name, "registered_version": champion.version if champion else None,
            "registered_alias": tracking.tags.CHAMPION_ALIAS if champion else None})


def summary(version: tracking.RegisteredVersion | None, value: float | None = None) -> dict[str, Any] | None:
    """A registered version as the report shows it."""
    if version is None:
        return None
    found = {"version": version.version, "run_id": version.run_id,
             "weights_sha256": version.tags.get(tracking.tags.VERSION_WEIGHTS_SHA256),
             "test_data_hash": version.tags.get(tracking.tags.VERSION_TEST_DATA_HASH),
             "metrics": version.test_metrics()}
    return found if value is None else {**found, "value": value}


def decide(gate: PromoteGate, candidate: Candidate, previous: tracking.RegisteredVersion | None
           ) -> tuple[list[Check], bool, tracking.RegisteredVersion | None]:
    """The checks, whether they all passed, and the champion after the gate (the candidate when it passed)."""
    against = champion_check(gate, candidate, previous)
    checks = bound_checks(gate, candidate.metrics) + ([against] if against else [])
    passed = all(c.passed for c in checks)
    return checks, passed, candidate.version if passed else previous


def report_of(task: str, gate: PromoteGate, candidate: Candidate, checks: list[Check], promoted: bool, line: str,
              previous: tracking.RegisteredVersion | None, champion: tracking.RegisteredVersion | None,
              champion_dir: Path) -> dict[str, Any]:
    """reports/promotion/<task>.json: the verdict, every check, the candidate, the champion before and after."""
    new = {**summary(candidate.version), "weights_sha256": candidate.weights_sha256,
           "test_data_hash": candidate.test_data_hash, "metrics": candidate.metrics}
    now = new if champion is not None and champion.version == candidate.version.version else summary(champion)
    metric = f"{PREFIX}{gate.metric}"
    return {"task": task, "registered_model": candidate.version.name, "passed": all(c.passed for c in checks),
            "promoted": promoted, "verdict": line, "failed": [c.name for c in checks if not c.passed],
            "checks": [asdict(c) for c in checks], "candidate": new,
            "previous_champion": summary(previous, previous.number(metric)) if previous else None,
            "same_test_data": comparable(previous, candidate, metric) if previous else None,
            "champion": {**now, "model_dir": Path(champion_dir).as_posix()} if now else None}


def test_data_hash(params: Params, task: str, test_dir: Path, root: Path = PROJECT_ROOT) -> str:
    """What a test score was measured on: the prepared test folder's hash, and for a task whose test inputs are made
    from params as they load (reconstruct: `corruption`), those params too; a champion tested on other inputs (a
    noise level of 0.05 against 0.3) is then not comparable, as another test folder is not."""
    folder = tracking.data_hash(test_dir, root)
    adapter = get_task(task)
    if not hasattr(adapter, "made_by"):
        return folder
    made = json.dumps(adapter.made_by(params), sort_keys=True)
    return f"{folder}+{hashlib.sha256(made.encode()).hexdigest()[:16]}"


def run_promotion(params: Params, task: str, model_dir: Path, metrics_path: Path, test_dir: Path,
                  champion_dir: Path, report_path: Path, *, root: Path = PROJECT_ROOT,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Apply `promote.<task>` to the newest model, move the alias when it passes, write the champion's folder
    and the report; returns the report."""
    gate = params.promote.task(task)
    metrics = read_metrics(metrics_path, task)
    check_names(gate, metrics, task, metrics_path)
    test_hash = test_data_hash(params, task, Path(test_dir), root)
    tracking.configure(params.mlflow, root)
    candidate = read_candidate(Path(model_dir), metrics, test_hash, task)
    name, number = candidate.version.name, candidate.version.version
    previous = tracking.champion(name)
    checks, passed, champion = decide(gate, candidate, previous)
    is_champion = champion is not None and champion.version == number
    promoted = is_champion and (previous is None or previous.version != number)
    line = verdict(name, number, promoted, [c for c in checks if not c.passed], champion.version if champion else None)
    write_champion(Path(champion_dir), champion, candidate, Path(model_dir), name)  # checked before the alias moves
    if promoted:
        tracking.set_champion(name, number)
    record(candidate, passed, line, is_champion)
    report = report_of(task, gate, candidate, checks, promoted, line, previous, champion, Path(champion_dir))
    runtime.write_json(Path(report_path), report)
    log(f"promote {task}: {line}; wrote {report_path} and {champion_dir}")
    return report
