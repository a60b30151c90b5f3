"""DVC experiments compare: two `dvc exp run -S ...` of the real train and evaluate stages in a temp repo.

The metrics are `cache: false` and not git-ignored, so every commit and experiment holds them:
`dvc exp show` lists both experiments' metrics and `dvc metrics diff` compares them. The plots'
JSON and PNGs are cached by DVC, so `dvc plots diff` draws both revisions from the cache.
The repo holds dvc.yaml's train and evaluate stages for classify (with the project's plots), the
session's tiny prepared digits and a fixed search result in place of the stages before them.
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

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TASK = "classify"
TARGET = f"evaluate@{TASK}"
METRICS = f"reports/metrics/{TASK}.json"
BEST = {"task": TASK, "trial_id": "t0", "family": "lenet5", "model": {"width": 1},
        "train": {"lr": 0.02, "batch_size": 64}}
# Two experiments on the committed baseline; `epochs` is the train.<task> key the search does not read.
EXPERIMENTS = {"one-epoch": f"train.{TASK}.epochs=1", "two-epochs": f"train.{TASK}.epochs=2"}


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def pipeline(task: str) -> dict:
    """dvc.yaml's train and evaluate stages for one task, and the top-level plots of that task."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = {}
    for name in ("train", "evaluate"):
        stage = spec["stages"][name]
        stages[name] = {**stage, "foreach": {task: stage["foreach"][task]}}
    plots = [plot for plot in spec["plots"] if next(iter(plot)).startswith(task)]
    return {"stages": stages, "plots": plots}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, prepared_classify) -> tuple[Path, dict]:
    """A git + DVC repo whose baseline commit has no results, then the two experiments run."""
    root = tmp_path_factory.mktemp("dvc-exp")
    for package in ("pipelines", "models"):
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    run(["git", "init", "-q"], root, env)
    run(["dvc", "init", "-q"], root, env)
    for name in ("params.yaml", ".gitignore", ".dvc/config", ".dvc/plots/pr_by_class.json"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, root / name)
    shutil.copytree(prepared_classify, root / "data/prepared" / TASK)
    (root / "artifacts/search" / TASK).mkdir(parents=True)
    (root / "artifacts/search" / TASK / "best.json").write_text(json.dumps(BEST))
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline(TASK), sort_keys=False))
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "baseline"], root, env)
    for name, assignment in EXPERIMENTS.items():
        run(["dvc", "exp", "run", TARGET, "-n", name, "-S", assignment], root, env)
    return root, env


def test_the_metrics_are_committed_and_the_plots_cached(repo):
    root, env = repo
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], root, env).split()
    for name in EXPERIMENTS:
        (ref,) = [ref for ref in refs if ref.endswith(f"/{name}")]
        assert run(["git", "ls-tree", "-r", "--name-only", ref, "reports"], root, env).split() == [METRICS]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"][TARGET]
    outs = {out["path"] for out in lock["outs"]}
    assert {f"reports/plots/{TASK}", f"reports/images/{TASK}"} <= outs  # in DVC's cache: git-ignored
    ignored = run(["git", "status", "--porcelain", "--ignored", "reports"], root, env).split()
    assert {"reports/plots/", "reports/images/"} <= set(ignored), ignored


def test_exp_show_holds_both_experiments_metrics(repo):
    root, env = repo
    shown = json.loads(run(["dvc", "exp", "show", "--json"], root, env))
    experiments = {exp["name"]: exp for row in shown for exp in row.get("experiments") or []}
    assert set(EXPERIMENTS) <= set(experiments), list(experiments)
    for name in EXPERIMENTS:
        (revision,) = experiments[name]["revs"]
        metrics = revision["data"]["metrics"][METRICS]["data"]
        assert metrics["test_items"] > 0 and 0 <= metrics["test_accuracy"] <= 1


def test_metrics_diff_shows_the_change_between_experiments(repo):
    root, env = repo
    first, second = EXPERIMENTS
    diff = json.loads(run(["dvc", "metrics", "diff", first, second, "--json"], root, env))[METRICS]
    assert {"test_accuracy", "test_nll"} <= set(diff)
    assert diff["test_nll"]["old"] != diff["test_nll"]["new"]


def test_plots_diff_draws_pr_curves_per_class_and_the_images_of_both_experiments(repo):
    root, env = repo
    plots = json.loads(run(["dvc", "plots", "diff", *EXPERIMENTS, "--json"], root, env))["data"]
    (pr_curve,) = plots[f"{TASK} precision-recall per class"]
    content = pr_curve["content"]
    assert content["encoding"]["color"]["field"] == "class"
    values = content["data"]["values"]
    assert {v["rev"] for v in values} == set(EXPERIMENTS) and len({v["class"] for v in values}) == 10
    for image in ("grad_cam", "sample_predictions", "confusion_matrix"):
        entries = plots[f"reports/images/{TASK}/{image}.png"]
        assert {rev for entry in entries for rev in entry["revisions"]} == set(EXPERIMENTS)
