"""ONNX export of the models of tasks whose adapter `exports_onnx`, checked against PyTorch on ONNX Runtime.

The service runs the exported graph when `serve.backend: onnx` (detect models stay on
PyTorch: torchvision's detection post-processing is data-dependent). The export uses the
TorchScript-based exporter (`dynamo=False`): the dynamo exporter needs onnxscript, which
the pinned stack does not ship.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.errors import ConvForgeError
from pipelines.tasks import TASKS

EXPORTABLE = tuple(name for name, task in TASKS.items() if task.exports_onnx)
OPSET = 17


def _input_shape(config: dict[str, Any], batch: int) -> tuple[int, int, int, int]:
    size = config["image_size"]
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    return batch, int(config["in_channels"]), size, size


def export_onnx(module: nn.Module, config: dict[str, Any], path: Path) -> Path:
    """Write `module` (eval mode) as ONNX with a dynamic batch axis, atomically; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    example = torch.zeros(_input_shape(config, 2))
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx.tmp", delete=False) as handle:
        staging = Path(handle.name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape math
            torch.onnx.export(module, (example,), str(staging), input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path


def parity(module: nn.Module, config: dict[str, Any], path: Path, batch: int = 4, seed: int = 0) -> float:
    """Largest |torch - onnxruntime| logit difference on a seeded random normalized batch."""
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(_input_shape(config, batch), generator=generator)
    with torch.inference_mode():
        expected = module.eval()(inputs).float().numpy()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input": inputs.numpy()})
    return float(np.abs(got - expected).max())


def export_checked(module: nn.Module, config: dict[str, Any], path: Path, rtol: float = 1e-3) -> dict[str, Any]:
    """Export and check parity; a mismatch over rtol x max|logit| removes the file and is an error."""
    export_onnx(module, config, path)
    diff = parity(module, config, path)
    with torch.inference_mode():
        scale = float(module(torch.zeros(_input_shape(config, 1))).abs().max())
    tolerance = rtol * max(1.0, scale)
    if not diff <= tolerance:
        Path(path).unlink(missing_ok=True)
        raise ConvForgeError(f"{config.get('task')} {config.get('family')}: ONNX Runtime differs from PyTorch by "
                             f"{diff:.3g} (tolerance {tolerance:.3g}); serve it with serve.backend: torch")
    return {"path": Path(path).name, "opset": OPSET, "max_abs_diff": diff, "tolerance": tolerance}
