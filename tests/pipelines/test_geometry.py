"""Detector geometry from the training boxes: covers their 5th-95th percentile of sizes, keeps today's
geometry for today's items, and reaches the model through its hparams and config.json."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models import _checkpoint as checkpoint
from models import build, family
from pipelines.geometry import (DEFAULT, KEEP_RECALL, MIN_STRIDE, SCALE_STEP, Geometry, best_possible_recall, box_stats,
                                derive_geometry, fit_aspect_ratios, geometry_hparams, split_boxes)


def boxes_of(low: float, high: float, image: int, count: int = 4000, spread: float = 0.4, seed: int = 0) -> np.ndarray:
    """xyxy boxes on an `image` px canvas, sqrt(w h) log-uniform in [low, high], log(h / w) ~ N(0, spread)."""
    rng = np.random.default_rng(seed)
    size = np.exp(rng.uniform(math.log(low), math.log(high), count))
    ratio = np.exp(rng.normal(0.0, spread, count))
    w, h = np.minimum(size / np.sqrt(ratio), image), np.minimum(size * np.sqrt(ratio), image)
    x, y = rng.uniform(0, image - w), rng.uniform(0, image - h)
    return np.stack([x, y, x + w, y + h], 1)


def assert_covers(geometry: Geometry, boxes: np.ndarray) -> None:
    """Every size between the 5th and 95th percentile has an anchor within sqrt(1.5)x; FCOS's levels run
    contiguously, the finest small enough for the 5th percentile (two cells across, or the finest stride
    any backbone has) and the coarsest one's range reaching the 95th."""
    stats = box_stats(boxes)
    anchors = np.array([a for level in geometry.anchor_sizes() for a in level])
    for size in np.geomspace(stats.low, stats.high, 64):
        assert np.abs(np.log(anchors / size)).min() <= math.log(SCALE_STEP) / 2 + 1e-6, size
    ranges = geometry.fcos_ranges()
    assert all(upper == pytest.approx(lower) for (_, upper), (lower, _) in zip(ranges, ranges[1:]))
    assert geometry.strides[0] <= max(MIN_STRIDE, stats.low / 2) and ranges[-1][1] >= stats.high
    assert best_possible_recall(stats, geometry) >= KEEP_RECALL


def test_user_coco_sizes_get_a_coarser_pyramid_that_covers_them() -> None:
    boxes = boxes_of(20, 300, 512)
    assert best_possible_recall(box_stats(boxes), DEFAULT) < 0.6  # today's 8-48 px anchors miss most of them
    geometry = derive_geometry(boxes)
    assert geometry.strides == (8, 16, 32, 64, 128)
    assert geometry.anchor_scales == (2.0, 3.0)
    assert_covers(geometry, boxes)


def test_todays_items_keep_todays_geometry() -> None:
    boxes = boxes_of(8, 48, 64)
    assert derive_geometry(boxes) == DEFAULT
    assert DEFAULT.strides == (4, 8, 16) and DEFAULT.anchor_sizes()[0] == (8.0, 12.0)
    assert_covers(DEFAULT, boxes)


@pytest.mark.parametrize("low,high,image", [(4, 12, 64), (30, 900, 1024), (40, 60, 320)])
def test_small_large_and_narrow_size_ranges_are_covered(low: float, high: float, image: int) -> None:
    boxes = boxes_of(low, high, image)
    geometry = derive_geometry(boxes)
    assert len(geometry.strides) >= 2 and 4 <= geometry.strides[0] and geometry.strides[-1] <= 128
    assert_covers(geometry, boxes)


def test_aspect_ratios_are_clustered_from_the_boxes() -> None:
    tall = np.full(300, 2.0)
    wide = np.full(300, 0.25)
    assert fit_aspect_ratios(np.concatenate([tall, wide])) == (0.25, 2.0)
    assert fit_aspect_ratios(np.array([])) == DEFAULT.aspect_ratios
    geometry = derive_geometry(boxes_of(20, 300, 512, spread=0.8))
    assert geometry.aspect_ratios[0] < 0.6 < 1.6 < geometry.aspect_ratios[-1]


def test_boxes_come_from_eager_targets_and_from_lazy_coco_annotations() -> None:
    eager = SimpleNamespace(targets=[{"boxes": torch.tensor([[0.0, 0.0, 10.0, 20.0]])}, {"boxes": torch.zeros(0, 4)}])
    lazy = SimpleNamespace(targets=SimpleNamespace(annotations=[[{"bbox": [0, 0, 10, 20]}], []]))
    assert split_boxes(eager).tolist() == split_boxes(lazy).tolist() == [[0.0, 0.0, 10.0, 20.0]]
    stats = box_stats(np.array([[0, 0, 10, 40], [0, 0, 1, 1]]))  # the 1 px box is left out
    assert stats.sizes.tolist() == [20.0] and stats.ratios.tolist() == [4.0]


def test_each_family_takes_its_own_geometry_hparams() -> None:
    data = SimpleNamespace(targets=[{"boxes": torch.from_numpy(boxes_of(20, 300, 512, count=500))}])
    fcos = geometry_hparams(family("detect", "fcos").defaults, data)
    rcnn = geometry_hparams(family("detect", "faster_rcnn").defaults, data)
    assert set(fcos) == {"strides", "anchor_scale"}
    assert set(rcnn) == {"strides", "anchor_scales", "aspect_ratios"}
    assert fcos["strides"] == rcnn["strides"] == [8, 16, 32, 64, 128]
    assert geometry_hparams(family("classify", "resnet").defaults, data) == {}
    assert geometry_hparams(family("detect", "fcos").defaults, SimpleNamespace(images=None)) == {}
    json.dumps(rcnn)  # config.json records them as they are


@pytest.mark.parametrize("name", ["fcos", "faster_rcnn", "mask_rcnn"])
def test_the_derived_geometry_builds_is_saved_and_rebuilt(name: str, tmp_path) -> None:
    data = SimpleNamespace(targets=[{"boxes": torch.from_numpy(boxes_of(20, 300, 256, count=500))}])
    hparams = {"backbone_hparams": {"depth": 10, "width": 8},
               **geometry_hparams(family("detect", name).defaults, data)}
    torch.manual_seed(0)
    model = build("detect", name, 2, 1, 256, **hparams)
    levels = [tuple(sizes) for sizes in model.anchor_generator.sizes] if name == "fcos" \
        else [tuple(sizes) for sizes in model.rpn.anchor_generator.sizes]
    expected = Geometry(**{**DEFAULT.__dict__, **{k: tuple(v) if isinstance(v, list) else v
                                                 for k, v in hparams.items() if k != "backbone_hparams"}})
    if name == "fcos":
        assert levels == [(expected.anchor_scale * s,) for s in expected.strides]
    else:  # plus the max-pooled level the RPN also looks at
        strides = [*expected.strides, 2 * expected.strides[-1]]
        assert levels == [tuple(k * s for k in expected.anchor_scales) for s in strides]
    config = {"task": "detect", "family": name, "num_classes": 2, "in_channels": 1, "image_size": 256,
              "hparams": hparams}
    checkpoint.save(model, config, tmp_path)
    rebuilt, saved = checkpoint.load(tmp_path)
    assert saved["hparams"]["strides"] == [8, 16, 32, 64, 128]
    image = [torch.rand(1, 256, 256)]
    with torch.no_grad():
        first, second = model.eval()(image), rebuilt(image)
    assert torch.equal(first[0]["boxes"], second[0]["boxes"])
