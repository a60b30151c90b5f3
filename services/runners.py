"""One served model per task: loading, its backend (services/backends.py), adaptive batching, and its request defaults.

Batching is BentoML's own CORK dispatcher (services/batching.py), used in-process: each
endpoint stays one short async method that decodes, awaits its images' places in the shared
per-model batch, and encodes; no internal HTTP hop or serialization, and no internal batch
route open to clients. The dispatcher sheds load whose queue wait would exceed
`max_latency_ms` (then the client gets 503 + Retry-After), estimated by pixels: each image weighs
its pixels over the training input's. What a batch's outputs are per image is the task's
endpoint (services/endpoints.py).

With `serve.scale: native` detect/segment inputs differ in size: a batch runs one forward per
input size (images of one size share a tensor), and a torchvision detector's internal resize
is set to each forward's own size, so it sees the pixels as sent. ONNX graphs have a fixed
input size, so native scale serves from torch. `serve.backend: auto` serves what the package
stage chose (recorded with the model), else what services.backends.choose says now.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from services import observability as obs
from services.backends import OnnxBackend, TorchBackend, choose, on_device, read_figures
from services.batching import batched
from services.endpoints import endpoint, input_fit
from services.errors import InputError, Overloaded
from services.imaging import Domain, Fit, native
from services.schemas import Options

# A detector's score threshold when its config.json has none (saved before training chose one on val)
DEFAULT_SCORE_THRESHOLD = 0.25


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


class TaskRunner:
    """A loaded model of one task behind a batching queue."""

    module: Any = None  # the PyTorch module, also when ONNX Runtime serves: POST /explain needs its gradients

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
        self.score_threshold = float(config.get("score_threshold", DEFAULT_SCORE_THRESHOLD))
        mean = np.asarray(config["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(config["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        # (x / 255 - mean) / std as one multiply-add: x * scale + shift
        self.scale, self.shift = (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)
        self.backend = backend
        self.max_batch_size = max(1, int(max_batch_size))  # 1 = batching off (serial queue)

        def overloaded() -> None:
            raise Overloaded(f"{self.task} queue is over its {max_latency_ms} ms latency budget")

        self._submit = batched(self._run_batch, max_latency_ms, self.max_batch_size, overloaded, self._cost)

    def options(self, given: dict[str, Any], top_k: int) -> Options:
        """A request's (validated) options with this model's defaults where it set none: `top_k` (serve.top_k),
        `score_threshold` (the one training chose on val at max F1, stored with the model) and `mask_format` (png
        where the model answers masks, else none to echo); a 400 InputError for a `mask_format` sent to a model of
        a task that echoes it but which answers no masks (a box-only detector)."""
        threshold, mask_format = given.get("score_threshold"), given.get("mask_format")
        if mask_format is not None and not self.masks and "mask_format" in endpoint(self.task).echoes:
            raise InputError(400, f"mask_format: the served {self.task} model ({self.card.family}) answers boxes "
                                  "only, no masks; leave mask_format out")
        return Options.model_construct(**{
            **given, "top_k": given.get("top_k") or top_k,
            "score_threshold": self.score_threshold if threshold is None else threshold,
            "mask_format": mask_format or ("png" if self.masks else None)})

    @property
    def masks(self) -> bool:
        """Whether the model answers masks (every segmenter; a detector with a mask head): `mask_format` applies."""
        return endpoint(self.task).masks(self.module)

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] to the model's float32 [N, C, H, W] input (training's mean/std)."""
        count, height, width, channels = images.shape
        batch = np.empty((count, channels, height, width), np.float32)  # C-contiguous, as the backends want
        np.multiply(images.transpose(0, 3, 1, 2), self.scale, out=batch)
        batch += self.shift
        return batch

    @property
    def device(self) -> str:
        """Where the model runs: cpu or cuda (ONNX Runtime without its CUDA provider runs on the cpu)."""
        return str(getattr(self.backend, "device", "cpu"))

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

    def _cost(self, job: tuple[np.ndarray, float]) -> float:
        """A job's weight in the batching latency model: its input's pixels over the training input's (1 for every
        fitted upload; a native-scale one is weighed by its own pixels)."""
        image, _ = job
        return image.shape[0] * image.shape[1] / self.image_size ** 2

    def _run_batch(self, jobs: tuple[tuple[np.ndarray, float], ...]) -> list[BatchOutput]:
        start = time.perf_counter()
        outputs = self.run_sizes([image for image, _ in jobs])
        elapsed = time.perf_counter() - start
        obs.BATCH_SIZE.labels(self.task, self.card.version).observe(len(jobs))
        return [BatchOutput(out, start - queued, elapsed, len(jobs)) for out, (_, queued) in zip(outputs, jobs)]

    async def predict(self, image: np.ndarray, owner: Any = None) -> BatchOutput:
        """One uint8 [H, W, C] image through the shared batch; raises Overloaded when shedding load. `owner`: the
        request it belongs to (its own images never count against it when the queue decides to shed)."""
        return await self._submit((image, time.perf_counter()), owner)

    def warm_up(self) -> float:
        """Run the model at batch 1 and at the largest batch once; returns the seconds it took."""
        start = time.perf_counter()
        for n in sorted({1, self.max_batch_size}) + [1]:
            self.run(np.zeros((n, self.image_size, self.image_size, self.in_channels), np.uint8))
        return time.perf_counter() - start


def backend_choice(task: str, asked: str, directory: Path, fit: Fit,
                   lineage: dict[str, Any]) -> tuple[str, str]:
    """(backend, reason) for a model in `directory` served with `fit`: under `auto`, the package stage's
    choice recorded in `lineage` (`backend`, `backend_reason`) while ONNX can still serve it, else
    services.backends.choose on bench/serve.py's committed figures."""
    has_onnx, fixed_size = (Path(directory) / "model.onnx").is_file(), fit.resize is not native
    recorded = lineage.get("backend")
    if asked == "auto" and recorded in ("torch", "onnx"):
        reason = str(lineage.get("backend_reason") or "chosen by the package stage")
        backend, why = choose(task, str(recorded), has_onnx, fixed_size, None)
        return (backend, reason) if backend == recorded else (backend, why)
    return choose(task, asked, has_onnx, fixed_size, read_figures() if asked == "auto" else None)


def load_runner(task: str, directory: Path, *, name: str, version: str, backend: str, max_batch_size: int,
                max_latency_ms: int, lineage: dict[str, Any] | None = None,
                expected_sha256: str | None = None, num_threads: int = 0, scale: str = "fit",
                max_side: int = 0, device: str = "cpu") -> TaskRunner:
    """Load `directory` (safetensors + config.json [+ model.onnx]) as a runner on `device` (cpu | cuda, as
    services.backends.serve_device resolved serve.device); records load time and info.

    `backend`: serve.backend (torch | onnx | auto; the card's lineage says why, `backend_reason`).
    `scale`/`max_side`: serve.scale (fit | native) and serve.max_side, for the tasks that can serve natively."""
    from models import _checkpoint as checkpoint

    start = time.perf_counter()
    module, config = checkpoint.load(Path(directory), expected_sha256=expected_sha256, device="cpu")
    fit = input_fit(task, _size(config), scale, max_side)
    lineage = dict(lineage or {})
    chosen, reason = on_device(*backend_choice(task, backend, Path(directory), fit, lineage), device)
    runner_backend = (OnnxBackend(Path(directory) / "model.onnx", task, num_threads, device) if chosen == "onnx"
                      else TorchBackend(module, task, device))
    if runner_backend.device != device:  # the CUDA provider failed to load (its CUDA libraries): torch serves
        runner_backend, reason = TorchBackend(module, task, device), "ONNX Runtime's CUDA provider did not load"
    lineage = {key: value for key, value in lineage.items() if key != "backend"} | {"backend_reason": reason}
    card = ModelCard(task=task, family=str(config.get("family", "")), name=name, version=version,
                     backend=runner_backend.name, lineage=lineage)
    runner = TaskRunner(card, config, runner_backend, max_batch_size, max_latency_ms, fit)
    runner.module = module.eval()
    obs.LOAD_SECONDS.labels(task, version).set(time.perf_counter() - start)
    obs.MODEL_INFO.labels(task, card.family, version, card.backend).set(1)
    return runner
