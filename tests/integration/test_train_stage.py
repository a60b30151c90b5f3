"""train@task and evaluate@task on the tiny prepared fixtures, with a real MLflow SQLite store in tmp.

One 1-epoch run per task: params, metrics, dataset input, plots (real PNGs), a registered model
version (the promote stage, not training, moves the `champion` alias), a pyfunc that loads back through MLflow
and predicts what the model predicts, then the test metrics JSON and DVC plot files.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.params import validate, Params

ROOT = Path(__file__).resolve().parents[2]
# The smallest member of one family per task.
BEST = {
    "classify": {"family": "lenet5", "model": {"width": 1}, "train": {"lr": 0.02, "batch_size": 64}},
    "detect": {"family": "fcos", "model": {"fpn_channels": 32, "head_convs": 1,
                                           "backbone_hparams": {"depth": 10, "width": 8}},
               "train": {"batch_size": 8}},
    "segment": {"family": "unet", "model": {"depth": 2, "width": 8}, "train": {"batch_size": 8}},
}
HEADLINE = {"classify": "test_accuracy", "detect": "test_map", "segment": "test_miou"}


def tiny_params(params: Params) -> Params:
    raw = params.model_dump()
    for task in ("classify", "detect", "segment"):
        raw["train"][task].update(epochs=1, warmup_epochs=0)
    raw["train"].update(num_threads=1)
    return validate(Params, raw)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield root, uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="module")
def trained(store, project_params, prepared_classify, prepared_scenes):
    """Train and evaluate each task once; returns {task: (config, metrics, out paths)}."""
    from pipelines.evaluation import run_evaluation
    from pipelines.training import run_training

    root, _ = store
    params = tiny_params(project_params)
    results = {}
    for task, data_root in (("classify", prepared_classify), ("detect", prepared_scenes),
                            ("segment", prepared_scenes)):
        best_path = root / "artifacts/search" / task / "best.json"
        best_path.parent.mkdir(parents=True, exist_ok=True)
        best_path.write_text(json.dumps({"task": task, "trial_id": "t0", **BEST[task]}))
        out_dir = root / "artifacts/models" / task
        torch.manual_seed(0)
        config = run_training(params, task, data_root, best_path, out_dir, root=root, log=lambda m: None)
        metrics_path, plots_dir = root / "reports/metrics" / f"{task}.json", root / "reports/plots" / task
        metrics = run_evaluation(params, task, data_root, out_dir, metrics_path, plots_dir, root=root,
                                 log=lambda m: None)
        results[task] = {"config": config, "metrics": metrics, "out": out_dir, "data": data_root,
                         "metrics_path": metrics_path, "plots": plots_dir}
    return results


@pytest.mark.parametrize("task", ["classify", "detect", "segment"])
def test_run_logs_params_metrics_dataset_and_real_images(trained, store, task, tmp_path):
    from mlflow import MlflowClient

    _, uri = store
    client = MlflowClient(uri)
    config = trained[task]["config"]
    run = client.get_run(config["mlflow_run_id"])
    assert run.data.params["family"] == BEST[task]["family"]
    assert run.data.params["data_hash"] == config["data_hash"] and config["data_hash"]
    assert run.data.params["train.epochs"] == "1"
    # the device as resolved (params.yaml says auto), with this machine's facts
    assert run.data.params["engine.device"] == "cpu" and int(run.data.params["hardware.cores"]) >= 1
    assert run.data.tags["convforge.device"].startswith("cpu (")
    primary = {"classify": "val_accuracy", "detect": "val_map", "segment": "val_miou"}[task]
    assert primary in run.data.metrics and "train_loss" in run.data.metrics
    assert HEADLINE[task] in run.data.metrics  # evaluate adds the test metrics to the same run
    per_class = {"classify": "per_class/test_accuracy/", "detect": "per_class/test_ap/",
                 "segment": "per_class/test_iou/"}[task]
    assert any(key.startswith(per_class) for key in run.data.metrics)
    assert [d.dataset.digest for d in run.inputs.dataset_inputs]
    local = Path(client.download_artifacts(run.info.run_id, "plots", str(tmp_path)))
    pngs = sorted(local.glob("*.png"))
    names = {p.name for p in pngs}
    assert {"learning_curves.png", "sample_predictions.png"} <= names
    assert sum(name.startswith("feature_maps_") for name in names) == 3
    if task == "classify":
        assert {"grad_cam.png", "confusion_matrix_val.png"} <= names
    for png in pngs:
        with Image.open(png) as image:
            image.load()
            assert image.size[0] > 16 and image.size[1] > 16


@pytest.mark.parametrize("task", ["classify", "detect", "segment"])
def test_model_is_registered_and_loads_back_through_mlflow(trained, store, task, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from models import _checkpoint as checkpoint
    from pipelines.engine import EngineSettings, predict
    from pipelines.tasks import get_task

    _, uri = store
    config = trained[task]["config"]
    name = f"convforge-{task}"
    # Training registers a version; only the promote stage moves the champion alias.
    registered = MlflowClient(uri).get_model_version(name, str(config["registered_version"]))
    assert registered.run_id == config["mlflow_run_id"]
    # MLflow's copy of the model folder and DVC's are the same files; the registration is DVC's alone.
    logged = Path(mlflow.artifacts.download_artifacts(registered.source, dst_path=str(tmp_path)))
    for name_on_disk in ("config.json", "model.safetensors", "history.json"):
        (copy,) = logged.rglob(name_on_disk)
        assert copy.read_bytes() == (trained[task]["out"] / name_on_disk).read_bytes(), name_on_disk
    assert not list(logged.rglob("registration.json"))

    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/{config['registered_version']}")
    data = get_task(task).load_split(trained[task]["data"], "test")
    images = data.images[:3]
    got = pyfunc.predict(images.numpy())
    model, saved = checkpoint.load(trained[task]["out"])
    direct = predict(model, task, images, saved["mean"], saved["std"],
                     EngineSettings(device="cpu", channels_last=False))
    if task == "detect":
        expected = torch.cat([d["scores"] for d in direct]) if direct else torch.zeros(0)
        assert list(got["image"]) == [i for i, d in enumerate(direct) for _ in range(len(d["scores"]))]
        np.testing.assert_allclose(got["score"].to_numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
        boxes = torch.cat([d["boxes"] for d in direct]).numpy() if direct else np.zeros((0, 4))
        np.testing.assert_allclose(got[["x1", "y1", "x2", "y2"]].to_numpy(), boxes, rtol=1e-5, atol=1e-4)
    elif task == "classify":
        np.testing.assert_allclose(got, direct.numpy(), rtol=1e-5, atol=1e-6)
        assert got.shape == (3, len(data.classes))
    else:
        np.testing.assert_array_equal(got, direct.numpy())
        assert got.shape == (3, *data.images.shape[-2:])


@pytest.mark.parametrize("task", ["classify", "detect", "segment"])
def test_saved_model_and_reports_follow_the_contracts(trained, task):
    result = trained[task]
    config = json.loads((result["out"] / "config.json").read_text())
    for key in ("task", "family", "hparams", "num_classes", "in_channels", "image_size", "classes", "mean", "std",
                "train", "weights_sha256", "data_hash", "mlflow_run_id", "registered_model", "search_trial_id",
                "git_commit"):
        assert key in config, key
    assert config["registered_model"] == f"convforge-{task}" and config["search_trial_id"] == "t0"
    registration = json.loads((result["out"] / "registration.json").read_text())
    assert registration == {"registered_model": f"convforge-{task}",
                            "registered_version": result["config"]["registered_version"]}
    metrics = json.loads(result["metrics_path"].read_text())
    assert all(isinstance(v, (int, float)) for v in metrics.values()) and not any("." in k for k in metrics)
    assert 0.0 <= metrics[HEADLINE[task]] <= 1.0
    plots = result["plots"]
    records = json.loads((plots / "learning_curve.json").read_text())
    assert records[0]["epoch"] == 1 and "train_loss" in records[0]
    assert (plots / "per_class.json").is_file()
    if task == "classify":
        confusion = json.loads((plots / "confusion.json").read_text())
        assert len(confusion) == metrics["test_items"] and set(confusion[0]) == {"actual", "predicted"}
        hits = sum(r["actual"] == r["predicted"] for r in confusion) / len(confusion)
        assert hits == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    if task in ("classify", "detect"):
        assert json.loads((plots / "pr_curve.json").read_text())
    for png in plots.glob("*.png"):
        with Image.open(png) as image:
            image.load()
    assert (plots / "sample_predictions.png").is_file()


def test_a_detector_keeps_its_val_threshold_and_is_evaluated_at_it(trained):
    from pipelines.metrics import COCO_CURVE, SERVED_CURVE

    result = trained["detect"]
    config = json.loads((result["out"] / "config.json").read_text())
    metrics = json.loads(result["metrics_path"].read_text())
    assert 0.0 < config["score_threshold"] <= 1.0  # chosen on val at max F1 by training
    assert metrics["test_score_threshold"] == pytest.approx(config["score_threshold"])
    assert {"test_precision", "test_recall", "test_f1", "test_detections_per_object"} <= set(metrics)
    curves = json.loads((result["plots"] / "pr_curve.json").read_text())
    assert {record["class"] for record in curves} == {COCO_CURVE, SERVED_CURVE}


def test_missing_best_json_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from pipelines.stages.train import main

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    for argv in (["train", "classify"], ["train", "nope"]):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        if argv[1] == "classify":
            assert "artifacts/search/classify/best.json" in lines[0] and "dvc repro search@classify" in lines[0]
        else:
            assert "usage: python -m pipelines.stages.train" in lines[0]
