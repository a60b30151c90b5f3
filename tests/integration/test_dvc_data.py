"""A real DVC repo in a temp folder: `dvc repro fetch augment` on digits, then a second repro does nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DATA_STAGES = ("fetch", "augment")


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("dvc-data")
    for package in ("pipelines", "models"):  # the data stages' deps (models' leaf helpers among them)
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["dataset"] = "digits"
    params["augment"]["preview_count"] = 16
    params["scenes"].update({"canvas_size": 32, "train_scenes": 30, "val_scenes": 8, "test_scenes": 8})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {s: stages[s] for s in DATA_STAGES}}, sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        run(cmd, root, env)
    return root, env


def test_repro_then_noop(repo):
    root, env = repo
    first = run(["dvc", "repro", *DATA_STAGES], root, env)
    for stage in DATA_STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    raw = json.loads((root / "data/raw/meta.json").read_text())
    assert raw["name"] == "digits" and raw["splits"]["train"] + raw["splits"]["test"] == 1797
    prepared = json.loads((root / "data/prepared/scenes/meta.json").read_text())
    assert prepared["counts"]["train"] == 30 and prepared["image_size"] == 32
    assert (root / "data/prepared/classify/val/images.npy").is_file()
    assert (root / "reports/augment/scenes_preview.png").is_file()
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(DATA_STAGES)

    second = run(["dvc", "repro"], root, env)
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout.lower()
    status = run(["dvc", "status"], root, env)
    assert "up to date" in status.stdout.lower()


def test_bytecode_caches_leave_code_deps_unchanged(tmp_path):
    """search@ and train@ list models/ whole (package lists services/): running the code with Python's default
    settings writes __pycache__/ into them, and that must not make `dvc repro` run the stage again."""
    shutil.copytree(ROOT / "models", tmp_path / "models", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".dvcignore", tmp_path / ".dvcignore")
    stage = {"cmd": f"{sys.executable} -c \"open('out.txt', 'w').write('built')\"", "deps": ["models"],
             "outs": ["out.txt"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"build": stage}}))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro"]):
        run(cmd, tmp_path, env)

    bytecode_env = {key: value for key, value in env.items() if key != "PYTHONDONTWRITEBYTECODE"}
    run([sys.executable, "-c", "import models; models.build('classify', 'lenet5', 10, 1, 28)"], tmp_path, bytecode_env)
    assert list((tmp_path / "models" / "__pycache__").glob("*.pyc"))
    status = run(["dvc", "status"], tmp_path, env)
    assert "up to date" in status.stdout.lower(), status.stdout
