"""ONNX export and parity (pipelines/export.py) on registry models."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models._registry import build
from pipelines.errors import ConvForgeError
from pipelines.export import export_checked, export_onnx, parity


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
