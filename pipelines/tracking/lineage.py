"""Where a run's inputs come from: the DVC hash of its data, the hash of the code that runs it and the
checked-out commit; and, for a replay, what a recorded run holds (params, metrics, JSON artifacts, its logged
model's config.json)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import mlflow
import yaml
from mlflow.exceptions import MlflowException

from pipelines.errors import ConvForgeError
from pipelines.runtime import sha256_file
from pipelines.tracking import tags
from pipelines.tracking.registry import MLMODEL, model_folder
from pipelines.tracking.store import PROJECT_ROOT, client, tracking_uri

def data_hash(data_dir: Path, root: Path = PROJECT_ROOT) -> str:
    """The DVC md5 of `data_dir` from dvc.lock's augment outs when recorded, else a SHA-256 over its files."""
    data_dir = Path(data_dir)
    lock = root / "dvc.lock"
    if lock.is_file():
        try:
            relative = data_dir.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            relative = None
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for out in stages.get("augment", {}).get("outs", []):
            if relative is not None and out.get("path") == relative and out.get("md5"):
                return str(out["md5"])
    if not data_dir.is_dir():
        raise ConvForgeError(f"{data_dir}: prepared data not found (run `dvc repro augment` first)")
    digest = hashlib.sha256()
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(data_dir).as_posix()}:{sha256_file(path)}\n".encode())
    return "sha256:" + digest.hexdigest()


CODE_PACKAGES = ("models", "pipelines")  # what a trial or a training run executes


def code_hash(root: Path = PROJECT_ROOT, packages: Iterable[str] = CODE_PACKAGES) -> str:
    """A SHA-256 over the project's Python sources (each package's `*.py`, by path and content): a search or an
    interrupted training run resumes only on the code that began it, so a changed engine or model reruns it."""
    digest = hashlib.sha256()
    for package in packages:
        for path in sorted((Path(root) / package).rglob("*.py")):
            digest.update(f"{path.relative_to(root).as_posix()}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()[:16]


# What makes a run besides its data: a change here that is not committed (`dvc exp run -S ...`) is not in the
# commit a run records; dvc.lock and the metrics a repro rewrites are left out
RUN_INPUTS = ("params.yaml", *CODE_PACKAGES)


def has_changes(root: Path = PROJECT_ROOT, paths: Iterable[str] = ()) -> bool:
    """Whether the work tree has uncommitted changes to tracked files (under `paths` when given; False outside
    git)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *paths], cwd=root,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


@dataclass(frozen=True)
class RecordedRun:
    """A finished run as MLflow holds it: ids, tags, params (strings) and its metrics' latest values."""

    run_id: str
    experiment_id: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]

    @property
    def parent_id(self) -> str | None:
        return self.tags.get(tags.PARENT_RUN)


def recorded_run(run_or_trial_id: str) -> RecordedRun:
    """The run named by an MLflow run id, or by a search trial's id (its child run of the search)."""
    store = client()
    try:
        run = store.get_run(run_or_trial_id)
    except MlflowException:
        experiments = [e.experiment_id for e in store.search_experiments()]
        found = store.search_runs(experiments, max_results=1,
                                  filter_string=f"tags.`{tags.TRIAL_ID}` = '{run_or_trial_id}'") if experiments else []
        if not found:
            raise ConvForgeError(f"{run_or_trial_id!r}: no MLflow run or search trial with this id in "
                                 f"{tracking_uri()}") from None
        run = found[0]
    return RecordedRun(run.info.run_id, run.info.experiment_id, dict(run.data.tags), dict(run.data.params),
                       dict(run.data.metrics))


def run_json(run_id: str, artifact_file: str) -> dict[str, Any]:
    """A JSON artifact of a run (e.g. `trial.json`), read back."""
    with tempfile.TemporaryDirectory(prefix="convforge-replay-") as tmp:
        try:
            local = client().download_artifacts(run_id, artifact_file, tmp)
        except (MlflowException, OSError) as exc:
            raise ConvForgeError(f"run {run_id} has no {artifact_file} ({exc}); it was not recorded by a search "
                                 "of this version") from None
        return json.loads(Path(local).read_text())


def logged_model_config(run_id: str) -> dict[str, Any]:
    """config.json of the model a training run logged (its model folder, as the run saved it)."""
    outputs = client().get_run(run_id).outputs
    models = [output.model_id for output in (outputs.model_outputs if outputs else [])]
    if not models:
        raise ConvForgeError(f"run {run_id} logged no model: is it a training run?")
    location = client().get_logged_model(models[-1]).artifact_location.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="convforge-replay-") as tmp:
        mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/{MLMODEL}", dst_path=tmp)
        folder = model_folder(Path(mlmodel), f"the model of run {run_id}")
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/{folder}/config.json", dst_path=tmp)
        return json.loads(Path(local).read_text())


def metric_history(run_id: str, key: str) -> dict[int, float]:
    """Each step's value of a run's metric (the last one logged at a step)."""
    return {m.step: m.value for m in sorted(client().get_metric_history(run_id, key), key=lambda m: m.timestamp)}


@contextmanager
def replay_run(original: RecordedRun, task: str, family: str) -> Iterator[str]:
    """The active run of a replay of `original`, in its experiment and tagged with its id; yields the new id."""
    run_tags = {tags.REPLAY_OF: original.run_id, tags.STAGE: "replay", tags.TASK: task, tags.FAMILY: family}
    with mlflow.start_run(experiment_id=original.experiment_id, run_name=f"replay-{task}-{family}",
                          tags=run_tags) as run:
        yield run.info.run_id
