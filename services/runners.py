"""One served model per task: loading, the torch / ONNX Runtime backends, and adaptive batching.

Batching is BentoML's own CORK dispatcher (services/batching.py), used in-process: each
endpoint stays one short async method that decodes, awaits its images' places in the shared
per-model batch, and encodes; no internal HTTP hop or serialization, and no internal batch
route open to clients. The dispatcher sheds load whose queue wait would exceed
`max_latency_ms` (then the client gets 503 + Retry-After). What a batch's outputs are per
image is the task's endpoint (services/endpoints.py).

With `serve.scale: native` detect/segment inputs differ in size: a batch runs one forward per
input size (images of one size share a tensor), and a torchvision detector's internal resize
is set to each forward's own size, so it sees the pixels as sent. ONNX graphs have a fixed
input size, so native scale serves from torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipelines.tasks import get_task
from services import observability as obs
from services.batching import batched
from services.endpoints import endpoint, input_fit
from services.errors import Overloaded
from services.imaging import Domain, Fit, native


@dataclass
class ModelCard:
    """What /version and the headers say about one served model."""

    task: str
    family: str
    name: str
    version: str
    backend: str
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class BatchOutput:
    """One image's raw model output plus how its batch went (for the stage metrics)."""

    value: Any
    queue_s: float
    inference_s: float
    batch_size: int


def _size(config: dict[str, Any]) -> int:
    size = config["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


class TorchBackend:
    """Runs the PyTorch module (eval mode, inference_mode) the way its task's adapter calls it."""

    name = "torch"

    def __init__(self, module: Any, task: str) -> None:
        import torch

        self.torch = torch
        self.module = module.eval()
        self.adapter = get_task(task)
        self.per_image = endpoint(task).per_image

    def __call__(self, batch: np.ndarray) -> list[Any]:
        with self.torch.inference_mode():
            outputs = self.adapter.forward(self.module, self.torch.from_numpy(batch))
            return self.per_image(_numpy(outputs))


class OnnxBackend:
    """Runs the exported ONNX graph on ONNX Runtime's CPU provider (tasks whose adapter `exports_onnx`)."""

    name = "onnx"

    def __init__(self, path: Path, task: str, num_threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = num_threads
        # Spinning threads starve the decoding threads on a small shared CPU.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.per_image = endpoint(task).per_image

    def __call__(self, batch: np.ndarray) -> list[Any]:
        (logits,) = self.session.run(None, {self.input_name: batch})[:1]
        return self.per_image(logits)


def _numpy(value: Any) -> Any:
    """Tensors (also inside lists and dicts) as numpy arrays: float ones as float32, the rest as they are."""
    if isinstance(value, dict):
        return {key: _numpy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_numpy(item) for item in value]
    return value.float().numpy() if value.is_floating_point() else value.numpy()


class TaskRunner:
    """A loaded model of one task behind a batching queue."""

    def __init__(self, card: ModelCard, config: dict[str, Any], backend: Callable[[np.ndarray], list[Any]],
                 max_batch_size: int, max_latency_ms: int, fit: Fit | None = None) -> None:
        self.card = card
        self.config = config
        self.task = card.task
        self.classes: list[str] = [str(c) for c in config["classes"]]
        self.image_size = _size(config)
        self.in_channels = int(config["in_channels"])
        self.fit = fit or input_fit(self.task, self.image_size)  # upload -> model input (services.imaging)
        self.domain = Domain.from_config(config)
        self.mean = np.asarray(config["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(config["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        self.backend = backend
        self.max_batch_size = max(1, int(max_batch_size))  # 1 = batching off (serial queue)

        def overloaded() -> None:
            raise Overloaded(f"{self.task} queue is over its {max_latency_ms} ms latency budget")

        self._submit = batched(self._run_batch, max_latency_ms, self.max_batch_size, overloaded)

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] to the model's float32 [N, C, H, W] input (training's mean/std)."""
        batch = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        return np.ascontiguousarray((batch - self.mean) / self.std, dtype=np.float32)

    def run(self, images: np.ndarray) -> list[Any]:
        """Run the backend on uint8 [N, H, W, C] images now, bypassing the queue (warm-up, tests)."""
        return self.backend(self.normalize(images))

    def run_sizes(self, images: list[np.ndarray]) -> list[Any]:
        """Run uint8 [H, W, C] images of possibly different sizes: one forward per size, outputs in order."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(index)
        outputs: list[Any] = [None] * len(images)
        for indices in by_shape.values():
            for index, output in zip(indices, self.run(np.stack([images[i] for i in indices]))):
                outputs[index] = output
        return outputs

    def _run_batch(self, jobs: tuple[tuple[np.ndarray, float], ...]) -> list[BatchOutput]:
        start = time.perf_counter()
        outputs = self.run_sizes([image for image, _ in jobs])
        elapsed = time.perf_counter() - start
        obs.BATCH_SIZE.labels(self.task, self.card.version).observe(len(jobs))
        return [BatchOutput(out, start - queued, elapsed, len(jobs)) for out, (_, queued) in zip(outputs, jobs)]

    async def predict(self, image: np.ndarray) -> BatchOutput:
        """One uint8 [H, W, C] image through the shared batch; raises Overloaded when shedding load."""
        return await self._submit((image, time.perf_counter()))

    def warm_up(self) -> float:
        """Run the model at batch 1 and at the largest batch once; returns the seconds it took."""
        start = time.perf_counter()
        for n in sorted({1, self.max_batch_size}) + [1]:
            self.run(np.zeros((n, self.image_size, self.image_size, self.in_channels), np.uint8))
        return time.perf_counter() - start


def load_runner(task: str, directory: Path, *, name: str, version: str, backend: str, max_batch_size: int,
                max_latency_ms: int, lineage: dict[str, Any] | None = None,
                expected_sha256: str | None = None, num_threads: int = 0, scale: str = "fit",
                max_side: int = 0) -> TaskRunner:
    """Load `directory` (safetensors + config.json [+ model.onnx]) as a runner; records load time and info.

    `scale`/`max_side`: serve.scale (fit | native) and serve.max_side, for the tasks that can serve natively."""
    from models import _checkpoint as checkpoint

    start = time.perf_counter()
    module, config = checkpoint.load(Path(directory), expected_sha256=expected_sha256, device="cpu")
    fit = input_fit(task, _size(config), scale, max_side)
    onnx_path = Path(directory) / "model.onnx"
    # Tasks whose models are not exported (detection) stay on torch; so do native sizes (fixed ONNX input).
    fixed_size = fit.resize is not native
    use_onnx = backend == "onnx" and get_task(task).exports_onnx and onnx_path.is_file() and fixed_size
    runner_backend = OnnxBackend(onnx_path, task, num_threads) if use_onnx else TorchBackend(module, task)
    card = ModelCard(task=task, family=str(config.get("family", "")), name=name, version=version,
                     backend=runner_backend.name, lineage=dict(lineage or {}))
    runner = TaskRunner(card, config, runner_backend, max_batch_size, max_latency_ms, fit)
    obs.LOAD_SECONDS.labels(task, version).set(time.perf_counter() - start)
    obs.MODEL_INFO.labels(task, card.family, version, card.backend).set(1)
    return runner
