"""One served model per task: loading, the torch / ONNX Runtime backends, and adaptive batching.

Batching is BentoML's own CORK dispatcher (the one behind `@bentoml.api(batchable=True)`),
used in-process: each endpoint stays one short async method that decodes, awaits its
images' places in the shared per-model batch, and encodes; no internal HTTP hop or
serialization, and no internal batch route open to clients. The dispatcher sheds load
whose queue wait would exceed `max_latency_ms` (then the client gets 503 + Retry-After).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from services import observability as obs
from services.errors import Overloaded

TASKS = ("classify", "detect", "segment")


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
    """Runs the PyTorch module (eval mode, inference_mode) and reduces outputs per task."""

    name = "torch"

    def __init__(self, module: Any, task: str) -> None:
        import torch

        self.torch = torch
        self.module = module.eval()
        self.task = task

    def __call__(self, batch: np.ndarray) -> list[Any]:
        torch = self.torch
        with torch.inference_mode():
            inputs = torch.from_numpy(batch)
            if self.task == "detect":
                outputs = self.module(list(inputs))
                return [{key: value.float().numpy() if key != "labels" else value.numpy()
                         for key, value in out.items()} for out in outputs]
            logits = self.module(inputs)
            return _reduce(self.task, logits.float().numpy())


class OnnxBackend:
    """Runs the exported ONNX graph on ONNX Runtime's CPU provider (classify and segment)."""

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
        self.task = task

    def __call__(self, batch: np.ndarray) -> list[Any]:
        (logits,) = self.session.run(None, {self.input_name: batch})[:1]
        return _reduce(self.task, logits)


def _reduce(task: str, logits: np.ndarray) -> list[Any]:
    """classify: softmax probabilities [C]; segment: label mask uint8 [S, S] (argmax, 0 = background)."""
    if task == "classify":
        shifted = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(shifted)
        probs /= probs.sum(axis=1, keepdims=True)
        return list(probs.astype(np.float32))
    return list(logits.argmax(axis=1).astype(np.uint8))


class TaskRunner:
    """A loaded model of one task behind a batching queue."""

    def __init__(self, card: ModelCard, config: dict[str, Any], backend: Callable[[np.ndarray], list[Any]],
                 max_batch_size: int, max_latency_ms: int) -> None:
        from bentoml._internal.marshal.dispatcher import CorkDispatcher

        self.card = card
        self.config = config
        self.task = card.task
        self.classes: list[str] = [str(c) for c in config["classes"]]
        self.image_size = _size(config)
        self.in_channels = int(config["in_channels"])
        self.mean = np.asarray(config["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(config["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        self.backend = backend
        self.max_batch_size = max(1, int(max_batch_size))  # 1 = batching off (serial queue)

        def overloaded() -> None:
            raise Overloaded(f"{self.task} queue is over its {max_latency_ms} ms latency budget")

        self.dispatcher = CorkDispatcher(max_latency_ms, self.max_batch_size, fallback=overloaded,
                                         get_batch_size=lambda job: 1)
        self._submit = self.dispatcher(self._run_batch)

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, C] to the model's float32 [N, C, S, S] input (training's mean/std)."""
        batch = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        return np.ascontiguousarray((batch - self.mean) / self.std, dtype=np.float32)

    def run(self, images: np.ndarray) -> list[Any]:
        """Run the backend on uint8 [N, S, S, C] images now, bypassing the queue (warm-up, tests)."""
        return self.backend(self.normalize(images))

    def _run_batch(self, jobs: tuple[tuple[np.ndarray, float], ...]) -> list[BatchOutput]:
        start = time.perf_counter()
        outputs = self.run(np.stack([image for image, _ in jobs]))
        elapsed = time.perf_counter() - start
        obs.BATCH_SIZE.labels(self.task, self.card.version).observe(len(jobs))
        return [BatchOutput(out, start - queued, elapsed, len(jobs)) for out, (_, queued) in zip(outputs, jobs)]

    async def predict(self, image: np.ndarray) -> BatchOutput:
        """One uint8 [S, S, C] image through the shared batch; raises Overloaded when shedding load."""
        return await self._submit((image, time.perf_counter()))

    def warm_up(self) -> float:
        """Run the model at batch 1 and at the largest batch once; returns the seconds it took."""
        start = time.perf_counter()
        for n in sorted({1, self.max_batch_size}) + [1]:
            self.run(np.zeros((n, self.image_size, self.image_size, self.in_channels), np.uint8))
        return time.perf_counter() - start


def read_config(directory: Path) -> dict[str, Any]:
    """The model's config.json (train stage's contract)."""
    return json.loads((Path(directory) / "config.json").read_text())


def load_runner(task: str, directory: Path, *, name: str, version: str, backend: str, max_batch_size: int,
                max_latency_ms: int, lineage: dict[str, Any] | None = None,
                expected_sha256: str | None = None, num_threads: int = 0) -> TaskRunner:
    """Load `directory` (safetensors + config.json [+ model.onnx]) as a runner; records load time and info."""
    from models import _checkpoint as checkpoint

    start = time.perf_counter()
    module, config = checkpoint.load(Path(directory), expected_sha256=expected_sha256, device="cpu")
    onnx_path = Path(directory) / "model.onnx"
    # Detection models stay on torch: only classify and segment are exported.
    use_onnx = backend == "onnx" and task != "detect" and onnx_path.is_file()
    runner_backend = OnnxBackend(onnx_path, task, num_threads) if use_onnx else TorchBackend(module, task)
    card = ModelCard(task=task, family=str(config.get("family", "")), name=name, version=version,
                     backend=runner_backend.name, lineage=dict(lineage or {}))
    runner = TaskRunner(card, config, runner_backend, max_batch_size, max_latency_ms)
    obs.LOAD_SECONDS.labels(task, version).set(time.perf_counter() - start)
    obs.MODEL_INFO.labels(task, card.family, version, card.backend).set(1)
    return runner
