"""`python -m pipelines.replay` on a training run: a tiny classify run trained and evaluated as the train and
evaluate stages do (real MLflow store in tmp, the repo's commit), replayed by the CLI to the same test metrics,
bit for bit; and the replay refusing data or code that are not the run's. (Search trials replay in
tests/integration/test_search.py, next to the searches that record them.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.errors import ConvForgeError
from pipelines.params import Params, validate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BEST = {"task": "classify", "trial_id": "t0", "family": "resnet", "model": {"depth": 10, "width": 8},
        "train": {"lr": 0.05, "batch_size": 64}}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, project_params, prepared_classify):
    """A 2-epoch classify training run with its test metrics, in its own store; returns (config.json, store URI)."""
    from pipelines.evaluation import run_evaluation
    from pipelines.training import run_training

    root = tmp_path_factory.mktemp("replay")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    raw = project_params.model_dump()
    raw["train"]["classify"].update(epochs=2, warmup_epochs=0)
    raw["train"].update(num_threads=1)
    params = validate(Params, raw)
    (root / "best.json").write_text(json.dumps(BEST))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        config = run_training(params, "classify", prepared_classify, root / "best.json", root / "model", root=ROOT,
                              log=lambda message: None)
        run_evaluation(params, "classify", prepared_classify, root / "model", root / "metrics.json", root / "plots",
                       root=ROOT, log=lambda message: None)
    return config, uri


def test_a_training_run_replays_to_its_recorded_test_metrics_exactly(recorded, prepared_classify):
    from mlflow import MlflowClient

    config, uri = recorded
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "pipelines.replay", config["mlflow_run_id"],
                             "--data", str(prepared_classify)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "(equal), all match" in result.stdout

    client = MlflowClient(uri)
    original = client.get_run(config["mlflow_run_id"])
    (replay,) = client.search_runs([original.info.experiment_id],
                                   filter_string=f"tags.`convforge.replay_of` = '{original.info.run_id}'")
    assert replay.data.tags["convforge.stage"] == "replay" and replay.data.metrics["replay_matches"] == 1.0
    tested = {key: value for key, value in original.data.metrics.items()
              if key.startswith(("test_", "per_class/test_"))}  # the headline and every class's
    assert len(tested) > 10 and 0.0 < tested["test_accuracy"] < 1.0  # learned something, not everything
    assert {key: replay.data.metrics[key] for key in tested} == tested  # every test metric, bit for bit
    assert replay.data.metrics["best_val_accuracy"] == original.data.metrics["best_val_accuracy"]


def test_replay_refuses_data_or_code_that_are_not_the_runs(recorded, prepared_classify, tmp_path):
    from pipelines import tracking
    from pipelines.replay import check_workspace, replay

    config, uri = recorded
    tracking.use_store(uri)
    other = tmp_path / "classify"
    shutil.copytree(prepared_classify, other)
    labels = np.load(other / "val" / "labels.npy")
    np.save(other / "val" / "labels.npy", labels[::-1].copy())
    with pytest.raises(ConvForgeError, match=rf"has data hash sha256:\w+, the run's was {config['data_hash']}: "
                                             rf"run `dvc checkout {other}` first"):
        replay(config["mlflow_run_id"], other, log=lambda message: None)
    old = "0" * 40
    with pytest.raises(ConvForgeError, match=rf"the run's was {old}: run `git checkout {old} && dvc checkout "):
        check_workspace(config["data_hash"], old, prepared_classify, log=lambda message: None)
    with pytest.raises(ConvForgeError, match="no MLflow run or search trial with this id"):
        replay("no-such-run", prepared_classify)
