"""Served models (services/runners.py): torch vs ONNX Runtime, the backend choice, adaptive batching, load shedding."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from models import _checkpoint as checkpoint
from models._registry import build
from pipelines.export import export_checked
from services.endpoints import input_fit
from services.errors import Overloaded
from services.runners import ModelCard, TaskRunner, load_runner

CLASSES = [str(i) for i in range(10)]


def save_tiny(directory, task: str = "classify", family: str = "lenet5", size: int = 16, export: bool = True,
              **hparams):
    torch.manual_seed(0)
    num_classes = 3 if task == "segment" else 10
    model = build(task, family, num_classes, 1, size, **hparams)
    config = {"task": task, "family": family, "hparams": hparams, "num_classes": num_classes, "in_channels": 1,
              "image_size": size, "classes": CLASSES[:num_classes], "mean": [0.3], "std": [0.2]}
    checkpoint.save(model, config, directory)
    if export:
        export_checked(model, config, directory / "model.onnx")
    return model, config


def images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


@pytest.mark.parametrize("task, family, hparams", [("classify", "lenet5", {}),
                                                   ("segment", "unet", {"depth": 2, "width": 8})])
def test_torch_and_onnx_backends_agree_with_the_model(tmp_path, task, family, hparams):
    model, config = save_tiny(tmp_path, task, family, **hparams)
    batch = images(4)
    runners = {backend: load_runner(task, tmp_path, name=f"convforge-{task}", version="v1", backend=backend,
                                    max_batch_size=8, max_latency_ms=1000) for backend in ("torch", "onnx")}
    assert runners["onnx"].card.backend == "onnx" and runners["torch"].card.backend == "torch"
    normalized = torch.from_numpy(batch.transpose(0, 3, 1, 2)).float() / 255
    with torch.inference_mode():
        logits = model.eval()((normalized - 0.3) / 0.2)
    out_torch, out_onnx = runners["torch"].run(batch), runners["onnx"].run(batch)
    if task == "classify":
        expected = torch.softmax(logits, 1).numpy()
        assert np.allclose(np.stack(out_torch), expected, atol=1e-5)
        assert np.allclose(np.stack(out_onnx), expected, atol=1e-4)
    else:
        expected = logits.argmax(1).numpy()
        assert (np.stack(out_torch) == expected).all()
        assert (np.stack(out_onnx) == expected).mean() > 0.999


def scenes(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 1] dark canvases with a bright square or two, like the training scenes."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 30, (n, size, size, 1), dtype=np.uint8)
    for image in out:
        for _ in range(2):
            y, x = rng.integers(0, size // 2, 2)
            image[y:y + size // 3, x:x + size // 3] = rng.integers(120, 256)
    return out


@pytest.mark.parametrize("family", ["fcos", "faster_rcnn"])
def test_a_detector_on_onnx_gives_torchs_detections(tmp_path, family):
    save_tiny(tmp_path, "detect", family, size=32)
    runners = {backend: load_runner("detect", tmp_path, name="convforge-detect", version="v1", backend=backend,
                                    max_batch_size=4, max_latency_ms=1000) for backend in ("torch", "onnx")}
    assert runners["onnx"].card.backend == "onnx" and runners["torch"].card.backend == "torch"
    batch = scenes(3)
    for expected, got in zip(runners["torch"].run(batch), runners["onnx"].run(batch)):  # each image on its own
        assert set(got) == set(expected) == {"boxes", "scores", "labels"}
        assert len(got["scores"]) == len(expected["scores"]) > 0 and got["labels"].dtype == expected["labels"].dtype
        free = np.ones(len(got["scores"]), bool)
        for box, score, label in zip(expected["boxes"], expected["scores"], expected["labels"]):
            twin = free & (got["labels"] == label) & (np.abs(got["boxes"] - box).max(1) < 1e-3) \
                & (np.abs(got["scores"] - score) < 1e-4)
            assert twin.any(), (box, score, label)  # the same detection, in whatever order
            free[np.argmax(twin)] = False


def test_auto_serves_the_packaged_choice_while_onnx_can_serve_it(tmp_path):
    save_tiny(tmp_path, "segment", "unet", depth=2, width=8)
    recorded = {"backend": "onnx", "backend_reason": "auto: 900 req/s at peak on onnx vs 400 on torch"}
    runner = load_runner("segment", tmp_path, name="convforge-segment", version="v1", backend="auto",
                         max_batch_size=4, max_latency_ms=1000, lineage={"git_commit": "abc", **recorded})
    assert runner.card.backend == "onnx"
    # /version prints the card's backend and then its lineage: the lineage must not carry a second `backend`
    assert runner.card.lineage == {"git_commit": "abc", "backend_reason": recorded["backend_reason"]}
    native = load_runner("segment", tmp_path, name="convforge-segment", version="v1", backend="auto",
                         max_batch_size=4, max_latency_ms=1000, lineage=recorded, scale="native", max_side=128)
    assert native.card.backend == "torch" and "native" in native.card.lineage["backend_reason"]
    plain = load_runner("segment", tmp_path, name="convforge-segment", version="v1", backend="torch",
                        max_batch_size=4, max_latency_ms=1000, lineage=recorded)
    assert plain.card.backend == "torch" and plain.card.lineage["backend_reason"] == "serve.backend: torch"


def test_concurrent_requests_share_batches_and_get_their_own_answers(tmp_path):
    save_tiny(tmp_path)
    runner = load_runner("classify", tmp_path, name="convforge-classify", version="v1", backend="torch",
                         max_batch_size=16, max_latency_ms=5000)
    inputs = images(48, seed=1)
    alone = runner.run(inputs)

    async def main():
        return await asyncio.gather(*(runner.predict(image) for image in inputs))

    outputs = asyncio.run(main())
    assert max(out.batch_size for out in outputs) > 1  # adaptive batching grouped them
    assert max(out.batch_size for out in outputs) <= 16
    for out, expected in zip(outputs, alone):
        assert np.allclose(out.value, expected, atol=1e-5)
        assert out.queue_s >= 0 and out.inference_s > 0


def test_over_the_latency_budget_the_queue_sheds_with_overloaded():
    def slow(batch: np.ndarray) -> list:
        time.sleep(0.02)
        return [np.ones(10, np.float32) / 10] * len(batch)

    card = ModelCard("classify", "slow", "convforge-classify", "v1", "torch")
    config = {"classes": CLASSES, "image_size": 16, "in_channels": 1, "mean": [0.0], "std": [1.0]}
    runner = TaskRunner(card, config, slow, max_batch_size=2, max_latency_ms=30)

    async def main():
        return await asyncio.gather(*(runner.predict(image) for image in images(60)), return_exceptions=True)

    outcomes = asyncio.run(main())
    shed = [o for o in outcomes if isinstance(o, Exception)]
    assert shed and all(isinstance(o, Overloaded) for o in shed)
    assert any(not isinstance(o, Exception) for o in outcomes)


async def pixel_priced_runner(max_latency_ms: int) -> TaskRunner:
    """A native-scale segment runner whose forward takes 0.2 s per megapixel (a large upload costs what its
    pixels cost), after the service's warm-up on training-size blanks (in the caller's event loop)."""
    def by_pixels(batch: np.ndarray) -> list:
        time.sleep(batch.size * 2e-7)
        return [np.zeros(batch.shape[2:], np.uint8)] * len(batch)

    card = ModelCard("segment", "slow", "convforge-segment", "v1", "torch")
    config = {"classes": CLASSES[:3], "image_size": 16, "in_channels": 1, "mean": [0.0], "std": [1.0]}
    runner = TaskRunner(card, config, by_pixels, max_batch_size=8, max_latency_ms=max_latency_ms,
                        fit=input_fit("segment", 16, "native", 1024))
    for _ in range(16):
        await runner.predict(SMALL)
    await asyncio.gather(*(runner.predict(SMALL) for _ in range(8)))
    return runner


SMALL, LARGE = np.zeros((16, 16, 1), np.uint8), np.zeros((512, 512, 1), np.uint8)  # 0.05 ms and 52 ms


def test_native_scale_weighs_uploads_by_pixels_in_the_latency_budget():
    """serve.scale native: after requests of large uploads, the latency model took every image for a large one:
    an idle server shed a request of 8 small images, and one of 2 large ones (0.1 s of work, a 0.1 s budget)."""
    async def requests():
        runner = await pixel_priced_runner(max_latency_ms=100)
        for count in [1, 2] * 8:  # the model learns from large uploads' batches (what their requests got: any)
            await asyncio.gather(*(runner.predict(LARGE) for _ in range(count)), return_exceptions=True)
        small = await asyncio.gather(*(runner.predict(SMALL) for _ in range(8)), return_exceptions=True)
        large = await asyncio.gather(*(runner.predict(LARGE) for _ in range(2)), return_exceptions=True)
        return small, large

    small, large = asyncio.run(requests())
    assert not [o for o in small + large if isinstance(o, Exception)], small + large


def test_native_scale_still_sheds_large_uploads_past_the_budget():
    """Six requests of one large upload each (52 ms apiece) at once pass a 0.1 s budget: some are shed."""
    async def requests():
        runner = await pixel_priced_runner(max_latency_ms=100)
        return await asyncio.gather(*(runner.predict(LARGE, owner=index) for index in range(6)),
                                    return_exceptions=True)

    outcomes = asyncio.run(requests())
    shed = [o for o in outcomes if isinstance(o, Exception)]
    assert shed and all(isinstance(o, Overloaded) for o in shed) and len(shed) < len(outcomes), outcomes


def test_warm_up_runs_both_batch_shapes(tmp_path):
    save_tiny(tmp_path)
    runner = load_runner("classify", tmp_path, name="convforge-classify", version="v1", backend="onnx",
                         max_batch_size=8, max_latency_ms=1000)
    assert runner.warm_up() > 0


def test_native_scale_runs_each_size_at_its_own_pixels(tmp_path):
    save_tiny(tmp_path, "segment", "unet", depth=2, width=8)
    runner = load_runner("segment", tmp_path, name="convforge-segment", version="v1", backend="onnx",
                         max_batch_size=8, max_latency_ms=1000, scale="native", max_side=256)
    assert runner.card.backend == "torch"  # the ONNX graph's input size is fixed
    small, wide = images(2, 32, seed=2), np.random.default_rng(3).integers(0, 256, (1, 64, 96, 1), np.uint8)
    mixed = runner.run_sizes([small[0], wide[0], small[1]])
    assert [m.shape for m in mixed] == [(32, 32), (64, 96), (32, 32)]
    assert np.array_equal(np.stack([mixed[0], mixed[2]]), np.stack(runner.run(small)))
    assert np.array_equal(mixed[1], runner.run(wide)[0])


def test_a_detector_sees_native_inputs_unresized(tmp_path):
    save_tiny(tmp_path, "detect", "fcos", size=32, export=False)
    runner = load_runner("detect", tmp_path, name="convforge-detect", version="v1", backend="torch",
                         max_batch_size=4, max_latency_ms=1000, scale="native", max_side=256)
    wide = np.random.default_rng(4).integers(0, 256, (1, 64, 96, 1), np.uint8)
    (out,) = runner.run_sizes([wide[0]])
    assert out["boxes"].shape[-1] == 4
    transform = runner.backend.module.transform
    with torch.inference_mode():
        batched, _ = transform([torch.zeros(1, 64, 96)])
    assert batched.image_sizes == [(64, 96)]
