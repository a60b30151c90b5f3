"""Scene composition and its COCO files: tight boxes, disjoint masks inside the canvas, valid classes,
RLE that decodes back to the written masks, and no item in two splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipelines.coco import decode_mask, encode_mask, read_split
from pipelines.datasets import load_scenes
from pipelines.errors import ConvForgeError
from pipelines.scenes import compose_scene, compose_scenes, item_foreground
from tests.fixtures import digits_splits, tiny_scene_params

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def items(project_params):
    raw = digits_splits(project_params, max_train=200, max_test=10)
    return raw.train_images, raw.train_labels, [f"train/{i}" for i in range(len(raw.train_labels))]


def test_scene_invariants(items, project_params):
    params = tiny_scene_params(project_params, max_items=4, max_overlap=0.5)
    rng = np.random.default_rng(3)
    counts = []
    for _ in range(60):
        scene = compose_scene(*items, params, rng)
        size = params.canvas_size
        k = len(scene.labels)
        counts.append(k)
        assert scene.image.shape == (size, size, 1) and scene.instance_masks.shape == (k, size, size)
        assert scene.semantic.shape == (size, size) and scene.boxes.shape == (k, 4)
        assert scene.instance_masks.sum(0).max() <= 1  # disjoint: later items occlude earlier ones
        assert set(scene.labels.tolist()) <= set(range(10))
        for mask, box, label in zip(scene.instance_masks, scene.boxes, scene.labels):
            ys, xs = np.nonzero(mask)
            assert len(xs) >= 4
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # tight, pixel edges
            assert (scene.semantic[mask] == label + 1).all()
        union = scene.instance_masks.any(0)
        assert (scene.semantic[~union] == 0).all()
        assert (scene.image[~union] == 0).all()  # the canvas is background where no instance shows
    assert min(counts) >= 1 and max(counts) >= 3


def test_earlier_items_stay_mostly_visible(items, project_params):
    params = tiny_scene_params(project_params, max_items=5, max_overlap=1.0, min_visible=0.6)
    rng = np.random.default_rng(5)
    for _ in range(30):
        scene = compose_scene(*items, params, rng)
        for mask, source in zip(scene.instance_masks, scene.sources):
            assert mask.sum() >= 4 and source.startswith("train/")


def test_same_seed_same_scenes(items, project_params):
    params = tiny_scene_params(project_params)
    first = compose_scenes(*items, 5, params, np.random.default_rng(9))
    second = compose_scenes(*items, 5, params, np.random.default_rng(9))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.instance_masks, b.instance_masks)
    assert [s.image_id for s in first] == [1, 2, 3, 4, 5]


def test_labels_past_254_classes_stop_instead_of_wrapping_or_being_ignored(items, project_params):
    images, labels, sources = items
    params = tiny_scene_params(project_params)
    past = labels + 290  # classes 290..299: as 291..300 in a uint8 mask they would wrap to 35..44
    with pytest.raises(ConvForgeError, match="300 classes; scenes .* at most 254"):
        compose_scenes(images, past, sources, 2, params, np.random.default_rng(0))
    with pytest.raises(ConvForgeError, match="at most 254"):  # class 254 would be 255, the ignored value
        compose_scene(images, np.full_like(labels, 254), sources, params, np.random.default_rng(0))
    assert compose_scene(images, np.full_like(labels, 253), sources, params, np.random.default_rng(0)).semantic.max() \
        == 254  # class 253, the last that fits


def test_item_foreground_uses_the_items_own_background():
    item = np.full((6, 6, 3), 200, np.uint8)
    item[2:4, 2:4] = 20  # dark object on a light background
    fg = item_foreground(item, threshold=32)
    assert fg.sum() == 4 and fg[2:4, 2:4].all()


def test_rle_roundtrip():
    mask = np.zeros((7, 9), bool)
    mask[1:4, 2:8] = True
    mask[5, 0] = True
    rle = encode_mask(mask)
    assert isinstance(rle["counts"], str) and rle["size"] == [7, 9]
    np.testing.assert_array_equal(decode_mask(rle), mask)


def test_coco_json_loads_in_pycocotools_and_matches_written_masks(prepared_scenes):
    meta = json.loads((prepared_scenes / "meta.json").read_text())
    for split in SPLITS:
        folder = prepared_scenes / split
        coco = COCO(str(folder / "instances.json"))
        assert sorted(coco.getCatIds()) == list(range(1, len(meta["classes"]) + 1))
        for image_id in coco.getImgIds():
            info = coco.loadImgs(image_id)[0]
            semantic = np.asarray(Image.open(folder / "masks" / info["file_name"]))
            assert semantic.shape == (info["height"], info["width"]) == (meta["image_size"],) * 2
            rebuilt = np.zeros_like(semantic)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
                mask = coco.annToMask(ann).astype(bool)
                assert ann["iscrowd"] == 0 and ann["area"] == mask.sum() > 0
                assert ann["bbox"] == mask_utils.toBbox(ann["segmentation"]).tolist()
                assert not rebuilt[mask].any()
                rebuilt[mask] = ann["category_id"]
            np.testing.assert_array_equal(rebuilt, semantic)


def test_load_scenes_matches_files(prepared_scenes):
    data = load_scenes(prepared_scenes, "val")
    scenes, classes = read_split(prepared_scenes / "val")
    assert len(data) == len(scenes) == 10 and data.classes == classes
    assert data.images.shape[1:] == (1, 40, 40) and data.masks.shape[1:] == (40, 40)
    for target, scene in zip(data.targets, scenes):
        assert target["labels"].tolist() == scene.labels.tolist()
        assert target["masks"].shape[1:] == (40, 40) and target["boxes"].dtype.is_floating_point
        for mask, box in zip(target["masks"], target["boxes"]):
            ys, xs = np.nonzero(mask.numpy())
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert len(data.subset(4, seed=0)) == 4


def test_no_item_in_two_splits(prepared_scenes):
    used = {}
    for split in SPLITS:
        data = json.loads((prepared_scenes / split / "instances.json").read_text())
        used[split] = {ann["source"] for ann in data["annotations"]}
        assert used[split]
    assert not used["train"] & used["val"] and not used["train"] & used["test"] and not used["val"] & used["test"]
    assert all(s.startswith("test/") for s in used["test"])
    assert all(s.startswith("train/") for s in used["train"] | used["val"])
