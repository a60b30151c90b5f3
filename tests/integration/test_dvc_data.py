"""A real DVC repo in a temp folder: `dvc repro` of the data stages on digits, then a second repro runs only the
source stage; on an own ImageFolder, a new image runs fetch again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.fixtures import assert_up_to_date, stages_run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DATA_STAGES = ("source", "fetch", "augment")


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
    assert stages_run(second.stdout) == {"source"}, second.stdout
    assert "Stage 'fetch' didn't change" in second.stdout
    assert_up_to_date(run(["dvc", "status"], root, env).stdout)


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


def write_photos(folder: Path, per_class: int = 6) -> None:
    """Two classes of small random RGB PNGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / name / f"{i}.png")


def raw_items(root: Path) -> int:
    meta = json.loads((root / "data/raw/meta.json").read_text())
    return meta["splits"]["train"] + meta["splits"]["test"]


def test_own_data_changes_run_fetch_again(tmp_path):
    """An own ImageFolder lives outside DVC's view (the params only name it): new and removed images must run
    fetch again, and a param put back must not restore data/raw from before the change out of DVC's run-cache."""
    photos, root = tmp_path / "photos", tmp_path / "repo"
    write_photos(photos)
    for package in ("pipelines", "models"):
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update({"dataset": f"imagefolder:{photos}", "image_size": 16})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {s: stages[s] for s in ("source", "fetch")}}))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        run(cmd, root, env)

    def repro(**data: object) -> set[str]:
        params["data"].update(data)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return stages_run(run(["dvc", "repro"], root, env).stdout)

    assert repro() == {"source", "fetch"} and raw_items(root) == 12
    assert repro() == {"source"}
    shutil.copy(photos / "a" / "0.png", photos / "a" / "new.png")
    assert repro(image_size=24) == {"source", "fetch"} and raw_items(root) == 13
    assert repro(image_size=16) == {"source", "fetch"} and raw_items(root) == 13
    (photos / "b" / "5.png").unlink()
    assert repro() == {"source", "fetch"} and raw_items(root) == 12
    source = json.loads((root / "data/source.json").read_text())
    assert source["dataset"] == f"imagefolder:{photos}" and source["tree"]["files"] == 12
