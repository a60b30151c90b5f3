"""train@task on two Ray Train workers (DDP over gloo on the CPU) against the one-process run, on a real local Ray
and a real MLflow SQLite store in tmp.

Same global batch (32: each worker takes 16), same seed, no augmentation and no dropout: DDP's averaged
gradient is the one-process gradient (but for each epoch's last, uneven batch: 9 items split 5/4), so the two runs
take the same steps, their losses agree within 2% and their test accuracy within 0.01; rank 0 alone logs each
epoch, once.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from pipelines.params import Params, validate

pytestmark = pytest.mark.integration

EPOCHS = 4
BEST = {"task": "classify", "trial_id": "t0", "family": "lenet5", "model": {"width": 1, "dropout": 0.0},
        "train": {"optimizer": "adamw", "lr": 0.005, "weight_decay": 0.0001, "batch_size": 32, "aug_strength": 0.0}}


def worker_params(params: Params, workers: int, storage: str) -> Params:
    raw = params.model_dump()
    raw["train"]["classify"].update(epochs=EPOCHS, warmup_epochs=0, ema_decay=0.0, mixup_alpha=0.0, cutmix_alpha=0.0,
                                    label_smoothing=0.0, early_stop_patience=0)
    # float32: the test compares DDP's averaged gradients with one process's; bf16 rounds each worker's half
    # batch on its own, noise that would need a tolerance too wide to catch a wrong average
    raw["train"].update(num_threads=1, workers=workers, use_gpu=False, device="cpu", amp="off")
    raw["search"].update(ray_address=None, storage=storage)
    return validate(Params, raw)


def test_two_workers_match_one(tmp_path, monkeypatch, project_params, prepared_classify):
    from models._checkpoint import load
    from mlflow import MlflowClient

    from pipelines.engine import EngineSettings, evaluate, fit
    from pipelines.tasks import get_task
    from pipelines.training import prepare, run_training

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    best = tmp_path / "best.json"
    best.write_text(json.dumps(BEST))
    test = get_task("classify").load_split(prepared_classify, "test")
    storage = tmp_path / "ray_results"
    # One process: the engine as train@task runs it with train.workers 1
    job = prepare(worker_params(project_params, 1, str(storage)), "classify", prepared_classify, best, tmp_path,
                  lambda message: None)
    one = fit(job.model, job.task, job.train, job.val, job.cfg, job.settings, policy=job.policy, log=None)
    acc_one = evaluate(one.model, "classify", test, EngineSettings(device="cpu"))["accuracy"]
    # Two Ray Train workers, through the train stage's function
    started = time.perf_counter()
    two = run_training(worker_params(project_params, 2, str(storage)), "classify", prepared_classify, best,
                       tmp_path / "model", root=tmp_path, log=print)
    print(f"2-worker run_training: {time.perf_counter() - started:.1f} s")
    acc_two = evaluate(load(tmp_path / "model")[0], "classify", test, EngineSettings(device="cpu"))["accuracy"]

    assert acc_one > 0.5, acc_one  # it learned: the comparison means something
    assert abs(acc_one - acc_two) <= 0.01, (acc_one, acc_two)
    assert two["val_score"] == pytest.approx(one.best_score, abs=0.03)
    store = MlflowClient()
    assert store.get_run(two["mlflow_run_id"]).data.params["workers"] == "2"
    history = store.get_metric_history(two["mlflow_run_id"], "train_loss")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))  # rank 0 only: one value per epoch
    for metric in history:  # the same steps: the loss over both workers is the one process's
        reference = one.history[metric.step - 1].metrics["train_loss"]
        assert metric.value == pytest.approx(reference, rel=0.02), (metric.step, metric.value, reference)
    assert two["registered_version"]
    # Ray Train's checkpoints of a finished run are gone, as the one-process run's resume folder is
    assert not any((tmp_path / "ray_results").glob("train-classify-*")), os.listdir(tmp_path / "ray_results")
