"""The reconstruct task end to end on easy data: a tiny training with the real engine, then the real service.

Easy data: bright rectangles on black (16 px), written as prepared classification items by the pipeline's own
writer and corrupted by `pipelines.reconstruction` exactly as the default data is (Gaussian noise, random
erasing). After a few epochs of a small U-Net, served by `python -m services.serve` beside a classifier,
/reconstruct restores 20 noisy test items at their own size with a mean PSNR gain of at least 3 dB (PSNR from
the service, against the `targets` sent with them), and bad inputs get the same 4xx answers as /classify.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from models import _checkpoint as checkpoint
from models._registry import build
from pipelines.datasets import ITEMS_DATA
from pipelines.engine import EngineSettings, fit
from pipelines.params import CorruptionParams
from pipelines.reconstruction import image_psnr, load_corrupted
from pipelines.tasks import ClassifyTask, ReconstructTask
from tests.fixtures import BAD_REQUESTS, assert_same_4xx, png_bytes, serving
from tests.integration.test_metrics_per_server import save_untrained, scrape

pytestmark = pytest.mark.integration

SIZE = 16
COUNTS = {"train": 1200, "val": 64, "test": 64}
FAMILY, HPARAMS = "unet", {"depth": 2, "width": 8}
RECONSTRUCT, CLASSIFY = ReconstructTask.name, ClassifyTask.name
CORRUPTION = CorruptionParams(noise_std=0.3, erasing=0.5, erasing_scale=[0.02, 0.12])


def rectangles(count: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, S, S, 1]: one filled rectangle of random size, place and brightness on black."""
    images = np.zeros((count, SIZE, SIZE, 1), np.uint8)
    for image in images:
        top, left = rng.integers(1, 8, size=2)
        height, width = rng.integers(4, 8, size=2)
        image[top:top + height, left:left + width, 0] = rng.integers(150, 256)
    return images


@pytest.fixture(scope="module")
def trained(tmp_path_factory, project_params):
    """The restorer after a few epochs, saved as the train stage saves it, beside an untrained classifier."""
    from pipelines.preparation import ItemsWriter

    root = tmp_path_factory.mktemp("rectangles") / ITEMS_DATA
    rng = np.random.default_rng(0)
    items = ItemsWriter(root, (SIZE, SIZE, 1))
    for split, count in COUNTS.items():
        items.add(split, rectangles(count, rng), np.zeros(count, np.int64))
    items.finish(["rectangle"], project_params.augment, project_params.seed)
    train, val, test = (load_corrupted(root, split, CORRUPTION) for split in COUNTS)
    torch.manual_seed(0)
    model = build(RECONSTRUCT, FAMILY, 1, 1, SIZE, **HPARAMS)
    cfg = project_params.train.task(RECONSTRUCT).updated(epochs=4, batch_size=32, lr=0.005, warmup_epochs=0)
    result = fit(model, RECONSTRUCT, train, val, cfg, EngineSettings(device="cpu", channels_last=False, seed=0),
                 log=None)
    models = save_untrained(tmp_path_factory.mktemp("models"), (CLASSIFY,), size=SIZE)
    checkpoint.save(result.model, {"task": RECONSTRUCT, "family": FAMILY, "hparams": HPARAMS, "num_classes": 1,
                                   "in_channels": 1, "image_size": SIZE, "classes": train.classes,
                                   "mean": train.mean, "std": train.std}, models / RECONSTRUCT)
    return {"test": test, "models": models}


png = png_bytes


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    yield from serving(trained["models"], tmp_path_factory.mktemp("serve"))


def test_twenty_noisy_items_come_back_at_their_size_with_3_db_more_psnr(server, trained):
    test = trained["test"]
    noisy, clean = test.images[:20, 0].numpy(), test.clean[:20, 0].numpy()
    files = [("images", (f"{i}.png", png(a), "image/png")) for i, a in enumerate(noisy)]
    files += [("targets", (f"{i}.png", png(a), "image/png")) for i, a in enumerate(clean)]
    reply = httpx.post(f"{server.base}/{RECONSTRUCT}", files=files, timeout=120)
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    restored = [np.asarray(Image.open(io.BytesIO(base64.b64decode(r["image"])))) for r in results]
    assert all(image.shape == (SIZE, SIZE) for image in restored) and len(results) == 20
    as_float = lambda arrays: torch.from_numpy(np.stack(arrays))[:, None].float() / 255  # noqa: E731
    ours = image_psnr(as_float(restored), as_float(list(clean)))
    assert [r["psnr"] for r in results] == pytest.approx(ours.tolist(), abs=1e-3)  # the service scores what it sends
    gain = float(ours.mean() - image_psnr(as_float(list(noisy)), as_float(list(clean))).mean())
    assert gain >= 3.0, gain
    counts = [s for s in scrape(server.base)["convforge_reconstruction_psnr_db"].samples
              if s.name.endswith("_count") and s.labels["task"] == RECONSTRUCT]
    assert [s.value for s in counts] == [20.0]


def test_json_targets_score_a_grown_image_at_its_own_size(server, trained):
    image = np.asarray(Image.fromarray(trained["test"].clean[0, 0].numpy()).resize((40, 24)))
    encoded = base64.b64encode(png(image)).decode()
    reply = httpx.post(f"{server.base}/{RECONSTRUCT}", json={"images": [encoded], "targets": [encoded]}, timeout=60)
    assert reply.status_code == 200, reply.text
    (result,) = reply.json()["results"]
    assert (result["width"], result["height"]) == (40, 24) and result["psnr"] > 10
    assert np.asarray(Image.open(io.BytesIO(base64.b64decode(result["image"])))).shape == (24, 40)


BAD_TARGETS = {
    "target not an image": ({"json": {"image": base64.b64encode(png(np.zeros((16, 16), np.uint8))).decode(),
                                      "targets": [base64.b64encode(b"not an image").decode()]}}, 400),
    "targets miscounted": ({"json": {"image": base64.b64encode(png(np.zeros((16, 16), np.uint8))).decode(),
                                     "targets": ["", ""]}}, 422),
    "target of another size": ({"json": {"image": base64.b64encode(png(np.zeros((16, 16), np.uint8))).decode(),
                                         "targets": [base64.b64encode(png(np.zeros((8, 8), np.uint8))).decode()]}},
                               422),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_inputs_get_the_same_4xx_as_classify(server, case):
    assert_same_4xx(server.base, RECONSTRUCT, CLASSIFY, case)


@pytest.mark.parametrize("case", list(BAD_TARGETS))
def test_bad_targets_get_a_one_line_4xx(server, case):
    request, status = BAD_TARGETS[case]
    answer = httpx.post(f"{server.base}/{RECONSTRUCT}", timeout=60, **request)
    assert answer.status_code == status, answer.text
    assert "\n" not in answer.json()["error"] and "targets" in answer.json()["error"]
