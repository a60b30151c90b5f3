"""A search trial is a short version of exactly the final run: the same config trained both ways, by a one-trial
search on real Ray and by the train stage, for the same epochs on the same items gives the same scores.

Both set up their run with pipelines/recipe.py (the config of their epochs, the model), on the CPU with
deterministic kernels and one thread, so the scores match exactly. Digits 16x16 (360 train / 40 val) for
classify, 1 epoch (a trial's warm-up was cut to fit, the final training's ran the whole epoch); the 40/10
digit scenes for segment (the task of the issue's FCN case), 2 epochs.
"""

from __future__ import annotations

import json

import pytest

from pipelines.params import Params, validate
from pipelines.tasks import PRIMARY

pytestmark = pytest.mark.integration

CLASSIFY, SEGMENT = "classify", "segment"
EPOCHS = {CLASSIFY: 1, SEGMENT: 2}
# One small family per task; the trial draws it at its registry defaults with train.<task>'s values.
FAMILY = {CLASSIFY: ("resnet", {"depth": [10], "width": [16]}), SEGMENT: ("fcn", {"backbone": ["resnet"]})}


def one_trial_params(project_params: Params, task: str, uri: str) -> Params:
    """A search of one trial of EPOCHS epochs on every training item, and a final training of EPOCHS epochs."""
    raw, epochs = project_params.model_dump(), EPOCHS[task]
    family, model_space = FAMILY[task]
    raw["search"].update(budget="epochs", scheduler="asha", algorithm="optuna", cpus_per_trial=1, gpus_per_trial=0.0,
                         max_concurrent=1, max_failures=0, ray_address=None, storage=None, max_latency_ms=None)
    raw["search"][task].update(families=[family], num_samples=1, max_epochs=epochs, grace_period=epochs,
                               time_budget_s=300, train_subset=None, model_space={family: model_space})
    # from scratch: this pins the run's set-up, not transfer (which needs this pipeline's trained classifier)
    raw["search"][task]["space"].update(batch_size=[32], pretrained=None, freeze=None, unfreeze_epoch=None)
    raw["train"][task].update(epochs=epochs, warmup_epochs=1, batch_size=32, pretrained=None)
    raw["train"].update(device="cpu", amp="off", compile=False, num_threads=1, num_workers="auto")
    raw["mlflow"]["tracking_uri"] = uri
    return validate(Params, raw)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from pipelines.tuner import init_ray

    init_ray(log=lambda message: None)
    yield
    ray.shutdown()


@pytest.mark.parametrize("task", [CLASSIFY, SEGMENT])
def test_a_trial_scores_what_the_final_training_of_its_config_scores(local_ray, task, project_params,
                                                                     prepared_classify, prepared_scenes,
                                                                     tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipelines.search import run_search
    from pipelines.training import run_training

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = one_trial_params(project_params, task, uri)
    data = prepared_classify if task == CLASSIFY else prepared_scenes
    search_dir = tmp_path / "artifacts/search" / task
    best = run_search(params, task, data, search_dir, storage=str(tmp_path / "ray"), log=lambda message: None)
    trial = [m.value for m in MlflowClient(uri).get_metric_history(best["mlflow_run_id"], PRIMARY[task])]

    final = run_training(params, task, data, search_dir / "best.json", tmp_path / "artifacts/models" / task,
                         root=tmp_path, log=lambda message: None)
    history = json.loads((tmp_path / "artifacts/models" / task / "history.json").read_text())

    assert len(trial) == EPOCHS[task] and best["score"] == trial[-1]
    assert [entry[PRIMARY[task]] for entry in history] == pytest.approx(trial, abs=1e-6)  # json keeps 6 digits
    assert final["val_score"] == max(trial)
