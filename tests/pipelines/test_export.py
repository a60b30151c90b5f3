"""ONNX export and parity (pipelines/export.py) on registry models: batch graphs and per-image detectors."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models._registry import build
from pipelines.errors import ConvForgeError
from pipelines.export import detection_parity, export_checked, export_onnx, parity, scene_like


@pytest.mark.parametrize("task, family, hparams", [("classify", "lenet5", {}),
                                                   ("segment", "unet", {"depth": 2, "width": 8})])
def test_export_has_a_dynamic_batch_and_matches_torch(tmp_path, task, family, hparams):
    torch.manual_seed(0)
    model = build(task, family, 4, 1, 16, **hparams).eval()
    config = {"task": task, "family": family, "image_size": 16, "in_channels": 1}
    report = export_checked(model, config, tmp_path / "model.onnx")
    assert report["max_abs_diff"] <= report["tolerance"]
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        (out,) = session.run(None, {"input": np.zeros((n, 1, 16, 16), np.float32)})
        assert out.shape[0] == n
    assert not list(tmp_path.glob("*.tmp"))


def test_parity_failure_removes_the_export(tmp_path):
    class Drifting(torch.nn.Module):
        """Traces one constant and runs with another: the exported graph cannot match."""

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3)
            self.offset = 0.0

        def forward(self, x):
            return self.conv(x).mean((2, 3)) + self.offset

    model = Drifting()
    config = {"task": "classify", "family": "drift", "image_size": 8, "in_channels": 1}
    export_onnx(model, config, tmp_path / "m.onnx")
    model.offset = 5.0
    assert parity(model, config, tmp_path / "m.onnx") == pytest.approx(5.0, abs=1e-4)

    import pipelines.export as export

    original = export.export_onnx

    def export_then_drift(module, cfg, path):
        result = original(module, cfg, path)
        module.offset = 5.0
        return result

    model.offset = 0.0
    export.export_onnx = export_then_drift
    try:
        with pytest.raises(ConvForgeError, match="ONNX Runtime differs"):
            export_checked(model, config, tmp_path / "bad.onnx")
    finally:
        export.export_onnx = original
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize("family", ["fcos", "faster_rcnn", "mask_rcnn"])
def test_a_detector_exports_for_one_image_and_matches_torchs_detections(tmp_path, family):
    torch.manual_seed(0)
    model = build("detect", family, 3, 1, 32).eval()
    config = {"task": "detect", "family": family, "image_size": 32, "in_channels": 1, "mean": [0.3], "std": [0.2]}
    report = export_checked(model, config, tmp_path / "model.onnx")
    assert report["missing"] == 0 and report["detections"] > 0 and report["batch"] == 1
    assert report["max_box_diff"] <= report["tolerance"] and report["max_score_diff"] <= 1e-3
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 1, 32, 32]
    names = [output.name for output in session.get_outputs()]
    assert set(names) == {"boxes", "scores", "labels"} | ({"masks"} if family == "mask_rcnn" else set())
    image = scene_like(config, 1, seed=5)[0]
    with torch.inference_mode():
        (expected,) = model([torch.from_numpy(image[0])])
    got = dict(zip(names, session.run(None, {"input": image})))
    assert len(got["scores"]) == len(expected["scores"])
    assert np.allclose(np.sort(got["scores"]), np.sort(expected["scores"].numpy()), atol=1e-4)


def test_detection_parity_finds_a_detector_that_drifted_from_its_export(tmp_path):
    torch.manual_seed(0)
    model = build("detect", "fcos", 3, 1, 32).eval()
    config = {"task": "detect", "family": "fcos", "image_size": 32, "in_channels": 1, "mean": [0.3], "std": [0.2]}
    export_onnx(model, config, tmp_path / "model.onnx")
    assert detection_parity(model, config, tmp_path / "model.onnx")["missing"] == 0
    with torch.no_grad():
        model.head.regression_head.bbox_reg.weight.mul_(1.5)  # boxes move; the graph keeps the old weights
    drifted = detection_parity(model, config, tmp_path / "model.onnx")
    assert drifted["missing"] > 0 and drifted["detections"] > 0


def test_export_leaves_the_model_in_eval_mode(tmp_path):
    """The exporter restores the exported wrapper's mode: the caller's model must stay in eval mode."""
    from models._registry import build
    from pipelines.export import export_onnx
    from pipelines.tasks import ClassifyTask

    model = build(ClassifyTask.name, "resnet", 4, 1, 16).eval()
    export_onnx(model, {"task": ClassifyTask.name, "image_size": 16, "in_channels": 1}, tmp_path / "m.onnx")
    assert not model.training and not any(m.training for m in model.modules())
