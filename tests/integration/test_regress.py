"""The regress task end to end on easy data: a tiny training with the real engine, then the real service.

Easy data: bars with a blob at one end (16 px), written as prepared classification items by the
pipeline's own writer and rotated by `pipelines.regression` exactly as the default data is. After a
few epochs the angle of tilted test items (|angle| >= 20 degrees) must be within 15 degrees on
average and beat predicting the mean angle; served by `python -m services.serve` beside a
classifier, /regress answers values and names equal to the engine's, and bad inputs get the same
4xx answers as /classify.
"""

from __future__ import annotations


import httpx
import numpy as np
import pytest
import torch

from models import _checkpoint as checkpoint
from models._registry import build, family
from pipelines.datasets import ITEMS_DATA
from pipelines.engine import EngineSettings, fit, predict
from pipelines.geometry import geometry_hparams
from pipelines.tasks import ClassifyTask, RegressTask
from tests.fixtures import BAD_REQUESTS, assert_same_4xx, png_bytes, serving
from tests.integration.test_metrics_per_server import save_untrained, scrape

pytestmark = pytest.mark.integration

SIZE = 16
COUNTS = {"train": 1500, "val": 100, "test": 300}
FAMILY, HPARAMS = "lenet5", {}
REGRESS, CLASSIFY = RegressTask.name, ClassifyTask.name


def bars(count: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, S, S, 1]: an upright bar from near the centre upwards, a blob on its top end (so the angle
    is unambiguous), with jittered length, thickness, position and brightness."""
    images = np.zeros((count, SIZE, SIZE, 1), np.uint8)
    for image in images:
        x, top, width = rng.integers(6, 9), rng.integers(2, 5), rng.integers(1, 3)
        bottom = rng.integers(10, 14)
        value = rng.integers(160, 256)
        image[top:bottom, x:x + width, 0] = value
        image[top:top + 3, x - 1:x + width + 1, 0] = value
    return images


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, project_params):
    """A data/prepared/classify-like folder of bars, written by the augment stage's writer."""
    from pipelines.preparation import ItemsWriter

    root = tmp_path_factory.mktemp("bars") / ITEMS_DATA
    rng = np.random.default_rng(0)
    items = ItemsWriter(root, (SIZE, SIZE, 1))
    for split, count in COUNTS.items():
        items.add(split, bars(count, rng), np.zeros(count, np.int64))
    items.finish(["bar"], project_params.augment, project_params.seed)
    return root


@pytest.fixture(scope="module")
def trained(prepared, project_params, tmp_path_factory):
    """The regressor after a few epochs, saved as the train stage saves it; its test split."""
    task = RegressTask()
    train, val, test = (task.load_split(prepared, split) for split in ("train", "val", "test"))
    defaults = family(REGRESS, FAMILY).defaults
    hparams = {**defaults, **geometry_hparams(defaults, train), **HPARAMS}
    torch.manual_seed(0)
    model = build(REGRESS, FAMILY, len(train.classes), train.in_channels, train.image_size, **hparams)
    cfg = project_params.train.task(REGRESS).updated(epochs=6, batch_size=32, lr=0.003, warmup_epochs=0)
    result = fit(model, REGRESS, train, val, cfg, EngineSettings(device="cpu", channels_last=False, seed=0),
                 policy=project_params.augment.policy, log=None)
    models = save_untrained(tmp_path_factory.mktemp("models"), (CLASSIFY,), size=SIZE)
    checkpoint.save(result.model, {"task": REGRESS, "family": FAMILY, "hparams": hparams,
                                   "num_classes": len(train.classes), "in_channels": 1, "image_size": SIZE,
                                   "classes": train.classes, "mean": train.mean, "std": train.std}, models / REGRESS)
    return {"model": result.model, "test": test, "models": models, "train": train}


def test_tilted_items_are_within_15_degrees_and_beat_the_mean(trained):
    test, model = trained["test"], trained["model"]
    tilted = (test.values[:, 0].abs() >= 20).nonzero().flatten()
    assert len(tilted) >= 50
    predicted = predict(model, REGRESS, test.images[tilted], test.mean, test.std, EngineSettings(device="cpu"))
    true = test.values[tilted]
    mae = float((predicted - true).abs().mean())
    baseline = float((trained["train"].values.mean() - true).abs().mean())
    assert mae <= 15.0 and mae < baseline, (mae, baseline)


png = png_bytes


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    yield from serving(trained["models"], tmp_path_factory.mktemp("serve"))


def test_served_values_and_names_equal_the_engine(server, trained):
    test = trained["test"]
    arrays = [test.images[i, 0].numpy() for i in range(3)]
    reply = httpx.post(f"{server.base}/{REGRESS}", files=[("images", (f"{i}.png", png(a), "image/png"))
                                                          for i, a in enumerate(arrays)], timeout=60)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["task"] == REGRESS and len(body["results"]) == 3
    expected = predict(trained["model"], REGRESS, test.images[:3], test.mean, test.std, EngineSettings(device="cpu"))
    for result, want in zip(body["results"], expected):
        assert result["names"] == ["angle"] and result.get("labels") is None
        assert result["values"] == pytest.approx(want.tolist(), abs=1e-3)
    counts = [sample for sample in scrape(server.base)["convforge_regression_value"].samples
              if sample.name.endswith("_count") and sample.labels["task"] == REGRESS]
    assert [(sample.labels["name"], sample.value) for sample in counts] == [("angle", 3.0)]




@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_inputs_get_the_same_4xx_as_classify(server, case):
    assert_same_4xx(server.base, REGRESS, CLASSIFY, case)
