"""The promotion gate in a real DVC repo in a temp folder: train@classify -> evaluate@classify -> promote@classify.

The first `dvc repro` (digits 16 px, lenet5, 4 epochs) passes the gate and becomes the champion; a worse
`dvc exp run` (gradients clipped to nothing: the model stays at chance) is registered as v2 but fails the
gate, so the registry's champion, the champion folder the package stage serves and its weights stay v1's,
and the summary says why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.reporting import collect, summary_text

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STAGES = ("train", "evaluate", "promote")
BEST = {"task": "classify", "trial_id": "t0", "family": "lenet5", "model": {"width": 1},
        "train": {"optimizer": "sgd", "lr": 0.05, "batch_size": 16, "aug_strength": 0.0}}  # ~0.9 test accuracy


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def classify_only(stages: dict) -> dict:
    """The train/evaluate/promote stages of dvc.yaml, their `foreach` cut down to classify."""
    kept = {}
    for name in STAGES:
        stage = dict(stages[name])
        stage["foreach"] = {"classify": stage["foreach"]["classify"]}
        kept[name] = stage
    return kept


@pytest.fixture(scope="module")
def repo(tmp_path_factory, prepared_classify) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("dvc-promote")
    for package in ("pipelines", "models"):
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(prepared_classify, root / "data/prepared/classify")
    (root / "artifacts/search/classify").mkdir(parents=True)
    (root / "artifacts/search/classify/best.json").write_text(json.dumps(BEST))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(num_threads=1, num_workers=0)
    params["train"]["classify"].update(epochs=4, warmup_epochs=0)
    params["promote"]["classify"] = {"metric": "accuracy", "margin": 0.0, "min": {"accuracy": 0.5}, "max": {}}
    params["mlflow"]["tracking_uri"] = "sqlite:///mlflow.db"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = classify_only(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    shutil.copy2(ROOT / ".gitignore", root / ".gitignore")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "tiny pipeline"]):
        run(cmd, root, env)
    return root, env


def champion_version(root: Path) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return int(client.get_model_version_by_alias("convforge-classify", "champion").version)


def test_a_worse_experiment_leaves_the_champion_and_the_served_model_unchanged(repo):
    root, env = repo
    first = run(["dvc", "repro"], root, env)
    assert "Running stage 'promote@classify'" in first.stdout
    report = json.loads((root / "reports/promotion/classify.json").read_text())
    assert report["passed"] and report["promoted"] and report["previous_champion"] is None, report
    assert report["champion"]["version"] == 1 and champion_version(root) == 1
    champion_dir = root / "artifacts/champion/classify"
    weights = (champion_dir / "model.safetensors").read_bytes()
    assert weights == (root / "artifacts/models/classify/model.safetensors").read_bytes()
    assert json.loads((champion_dir / "registration.json").read_text()) == {
        "registered_model": "convforge-classify", "registered_version": 1, "registered_alias": "champion"}
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "baseline"], root, env)

    worse = run(["dvc", "exp", "run", "-S", "train.classify.grad_clip=0.0001"], root, env)
    assert "Running stage 'train@classify'" in worse.stdout and "Running stage 'promote@classify'" in worse.stdout
    report = json.loads((root / "reports/promotion/classify.json").read_text())
    assert report["candidate"]["version"] == 2 and not report["passed"] and not report["promoted"], report
    assert "beats champion v1 on accuracy" in report["failed"] and report["same_test_data"] is True
    beat = next(c for c in report["checks"] if c["name"].startswith("beats champion"))
    assert beat["value"] < beat["bound"] == report["previous_champion"]["value"]
    assert report["champion"]["version"] == 1 and champion_version(root) == 1
    # The folder the package stage serves still holds v1's files, downloaded from the registry and checked.
    assert (champion_dir / "model.safetensors").read_bytes() == weights
    assert (root / "artifacts/models/classify/model.safetensors").read_bytes() != weights
    assert json.loads((champion_dir / "registration.json").read_text())["registered_version"] == 1

    assert "up to date" in run(["dvc", "status"], root, env).stdout

    summary = summary_text(collect(root), "sqlite:///mlflow.db", "127.0.0.1", 3000)
    assert "convforge-classify v2 not promoted (" in summary and "the champion stays v1" in summary, summary
    assert "the newest run was not promoted: the service keeps serving v1" in summary, summary

    # Back to the baseline commit: git and DVC restore what its dvc.lock records, the promotion verdict included
    # (it was in neither: promote reran and dvc.lock changed under the commit).
    run(["git", "checkout", "--", "."], root, env)
    run(["dvc", "checkout", "--force"], root, env)
    assert "up to date" in run(["dvc", "status"], root, env).stdout
    assert json.loads((root / "reports/promotion/classify.json").read_text())["candidate"]["version"] == 1


def _register(root: Path, seed: int, data) -> Path:
    """A lenet5 (weights from `seed`) saved, logged and registered as convforge-classify, as train@classify does."""
    import mlflow
    import torch

    from models import _checkpoint as checkpoint
    from models._registry import build
    from pipelines import tracking

    torch.manual_seed(seed)
    model = build("classify", "lenet5", len(data.classes), data.in_channels, data.image_size)
    folder = root / f"model-{seed}"
    experiment = tracking.ensure_experiment("convforge")
    with mlflow.start_run(experiment_id=experiment) as run:
        config = {"task": "classify", "family": "lenet5", "hparams": {}, "num_classes": len(data.classes),
                  "in_channels": data.in_channels, "image_size": data.image_size, "classes": data.classes,
                  "mean": data.mean, "std": data.std, "mlflow_run_id": run.info.run_id}
        sha = checkpoint.save(model, config, folder)
        card = tracking.ModelCard("classify", "lenet5", "val_accuracy", 0.5, "h", sha)
        registration = tracking.register_model(folder, model, data, "convforge-classify", card)
    (folder / "registration.json").write_text(json.dumps({"registered_model": registration.name,
                                                          "registered_version": registration.version}))
    return folder


def test_the_gate_against_a_real_registry(tmp_path, monkeypatch, project_params, prepared_classify):
    from pipelines import tracking
    from pipelines.datasets import load_classify
    from pipelines.errors import ConvForgeError
    from pipelines.params import Params, validate
    from pipelines.promotion import run_promotion

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.configure(project_params.mlflow, tmp_path)
    data = load_classify(prepared_classify, "test")
    test_dir = tmp_path / "test"
    shutil.copytree(prepared_classify / "test", test_dir)
    champion_dir, report_path, metrics_path = tmp_path / "champion", tmp_path / "report.json", tmp_path / "m.json"

    def promote(model_dir: Path, accuracy: float, min_accuracy: float) -> dict:
        raw = project_params.model_dump()
        raw["promote"]["classify"] = {"metric": "accuracy", "margin": 0.0, "min": {"accuracy": min_accuracy},
                                      "max": {}}
        metrics_path.write_text(json.dumps({"test_accuracy": accuracy, "test_items": 100}))
        return run_promotion(validate(Params, raw), "classify", model_dir, metrics_path, test_dir, champion_dir,
                             report_path, root=tmp_path, log=lambda line: None)

    first = _register(tmp_path, 0, data)
    report = promote(first, 0.5, 0.9)  # the first model fails: no champion, nothing to serve
    assert not report["passed"] and report["champion"] is None and report["failed"] == ["min accuracy"]
    assert report["verdict"].endswith("no champion: nothing to serve")
    assert tracking.champion("convforge-classify") is None
    assert [p.name for p in champion_dir.iterdir()] == ["registration.json"]
    assert json.loads((champion_dir / "registration.json").read_text())["registered_version"] is None
    assert tracking.model_version("convforge-classify", 1).tags["gate"] == "failed"

    assert promote(first, 0.5, 0.4)["promoted"]  # a lower bar: v1 becomes the champion, its files copied
    weights = (first / "model.safetensors").read_bytes()
    assert (champion_dir / "model.safetensors").read_bytes() == weights

    second = _register(tmp_path, 1, data)
    report = promote(second, 0.45, 0.4)  # worse than v1 on the same test data: v1's files from the registry
    assert report["failed"] == ["beats champion v1 on accuracy"] and report["champion"]["version"] == 1
    assert report["champion"]["metrics"] == {"test_accuracy": 0.5, "test_items": 100.0}  # v1's, from the registry
    assert (champion_dir / "model.safetensors").read_bytes() == weights
    assert tracking.champion("convforge-classify").version == 1

    tracking.tag_version("convforge-classify", 1, {"weights_sha256": "0" * 64})  # the registry disagrees
    with pytest.raises(ConvForgeError, match=r"registered model convforge-classify v1: weights SHA-256 \w+ differs"):
        promote(second, 0.45, 0.4)

    (test_dir / "extra.npy").write_bytes(b"new test data")  # v1 was tested on other data: not comparable
    report = promote(second, 0.45, 0.4)
    assert report["promoted"] and report["same_test_data"] is False
    assert tracking.champion("convforge-classify").version == 2
    assert (champion_dir / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
