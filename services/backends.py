"""What runs a served model, PyTorch or ONNX Runtime, and which of the two each task serves.

`TorchBackend` runs the module the way its task's adapter calls it; `OnnxBackend` runs the graph
pipelines/export.py wrote (a per-image graph, detection's, runs the images of a batch one by
one). `choose` is `serve.backend`: `torch`; `onnx` where the task exports, its model.onnx is there
and the input size is fixed (`serve.scale: fit`); `auto`, which takes onnx under those conditions
only where bench/serve.py's committed figures (FIGURES, key `backends`) say ONNX Runtime serves
more requests per second at peak. The choice reads a committed file, never a timing, so the
package stage stays deterministic; it records the choice with each packaged model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.tasks import get_task
from services.endpoints import endpoint

FIGURES_FILE = "bench/results/serve.json"  # bench/serve.py writes it; its `backends` key is what auto reads
FIGURES = Path(__file__).resolve().parents[1] / FIGURES_FILE


def serve_device(asked: str) -> str:
    """serve.device (auto | cpu | cuda) on this machine: cuda or cpu; cuda without a usable GPU is a user error."""
    from pipelines.runtime import probe, resolve

    return resolve(asked, "off", False, False, probe(), section="serve").device


def onnx_providers(device: str) -> list[str]:
    """ONNX Runtime's execution providers for `device`: CUDA's first where the installed wheel
    (onnxruntime-gpu) has it, the CPU's always (the fallback for operators CUDA's lacks)."""
    import onnxruntime as ort

    cuda = device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


class TorchBackend:
    """Runs the PyTorch module (eval mode, inference_mode) the way its task's adapter calls it, on `device`
    in the batch's dtype (float32: on the CPU the evaluated outputs up to kernel rounding; on Ampere and later
    GPUs torch's TF32 convolutions, ~1e-3 relative from the CPU's)."""

    name = "torch"

    def __init__(self, module: Any, task: str, device: str = "cpu") -> None:
        import copy

        import torch

        self.torch, self.device, self.target = torch, device, torch.device(device)
        # A copy on the GPU: the runner's own module stays on the CPU for POST /explain's gradients.
        self.module = (copy.deepcopy(module).to(self.target) if device == "cuda" else module).eval()
        self.adapter = get_task(task)
        self.per_image = endpoint(task).per_image

    def __call__(self, batch: np.ndarray) -> list[Any]:
        with self.torch.inference_mode():
            inputs = self.torch.from_numpy(batch).to(self.target, non_blocking=True)
            return self.per_image(_numpy(self.adapter.forward(self.module, inputs)))


def _numpy(value: Any) -> Any:
    """Tensors (also inside lists and dicts) as numpy arrays: float ones as float32, the rest as they are."""
    if isinstance(value, dict):
        return {key: _numpy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_numpy(item) for item in value]
    value = value.cpu()
    return value.float().numpy() if value.is_floating_point() else value.numpy()


class OnnxBackend:
    """Runs the exported graph on ONNX Runtime in the calling thread: on its CUDA provider where `device` is
    cuda and the wheel has it, else on its CPU provider."""

    name = "onnx"

    def __init__(self, path: Path, task: str, num_threads: int = 0, device: str = "cpu") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Operators one after another on the caller's thread (+ num_threads - 1 helpers; 0 = one per core),
        # no inter-op pool, and helpers that sleep when idle: spinning ones starve decoding on a small CPU.
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = num_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=onnx_providers(device))
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.per_graph_image = get_task(task).onnx_per_image
        self.per_image = endpoint(task).per_image

    def __call__(self, batch: np.ndarray) -> list[Any]:
        run, names = self.session.run, self.output_names
        if self.per_graph_image:  # one image per call; a C-contiguous batch's image[None] is one too
            return self.per_image([dict(zip(names, run(names, {self.input_name: image[None]}))) for image in batch])
        (logits,) = run(names, {self.input_name: batch})
        return self.per_image(logits)


def on_device(backend: str, reason: str, device: str) -> tuple[str, str]:
    """(backend, reason) on `device`: onnx on cuda needs ONNX Runtime's CUDA provider, else torch serves it."""
    if device == "cuda" and backend == "onnx" and onnx_providers(device)[0] != "CUDAExecutionProvider":
        return "torch", "serve.device cuda: this onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu has it)"
    return backend, reason


def read_figures(path: Path = FIGURES) -> dict[str, Any] | None:
    """bench/serve.py's per-task req/s by backend (`backends` of its result file), or None without one."""
    try:
        return dict(json.loads(Path(path).read_text())["backends"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _peak(figures: dict[str, Any], task: str, backend: str) -> float | None:
    try:
        return float(figures[task][backend]["rps_peak"])
    except (KeyError, TypeError, ValueError):
        return None


def choose(task: str, asked: str, has_onnx: bool, fixed_size: bool,
           figures: dict[str, Any] | None) -> tuple[str, str]:
    """(backend, reason) for `task` under serve.backend `asked` (torch | onnx | auto); `figures` as
    `read_figures` returns them (only auto reads them)."""
    if asked == "torch":
        return "torch", "serve.backend: torch"
    if not get_task(task).exports_onnx:
        return "torch", f"{task} models are not exported to ONNX"
    if not has_onnx:
        return "torch", "no model.onnx beside the weights (exported by the package stage)"
    if not fixed_size:
        return "torch", "serve.scale native: inputs of any size, the ONNX graph's is fixed"
    if asked == "onnx":
        return "onnx", "serve.backend: onnx"
    where = FIGURES_FILE
    if figures is None:
        return "torch", f"auto: no serving figures ({where} has no `backends`); torch by default"
    onnx, torch = _peak(figures, task, "onnx"), _peak(figures, task, "torch")
    if onnx is None or torch is None:
        return "torch", f"auto: {where} has no {task} figure for {'onnx' if onnx is None else 'torch'}"
    if onnx > torch:
        return "onnx", f"auto: {onnx:.0f} req/s at peak on onnx vs {torch:.0f} on torch ({where})"
    return "torch", f"auto: {torch:.0f} req/s at peak on torch vs {onnx:.0f} on onnx ({where})"
