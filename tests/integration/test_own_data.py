"""Own data at real resolution through `dvc repro ... evaluate@<task>` in temp clones of the working tree.

Three datasets the test writes: an ImageFolder of JPEGs of mixed sizes and modes with EXIF orientation
tags (size from `data.image_size: auto`), a COCO set of 512 px images with large high-contrast objects,
and a masks folder. Tiny budgets (one trial, few epochs): metrics are finite, and the easy COCO set
reaches detection mAP@0.5 above 0.5.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.test_end_to_end import BIN, clone, run, set_params

pytestmark = pytest.mark.integration

EXIF_ORIENTATION = 0x0112
# train@detect/segment also train the classifier (their trunk option reads it): one quick trial for it too
ONE_TRIAL = {"search.max_concurrent": 1, "augment.preview_count": 8, "train.num_workers": "auto",
             "search.classify.families": ["lenet5"], "search.classify.num_samples": 1,
             "search.classify.max_epochs": 1, "search.classify.train_subset": None, "train.classify.epochs": 1}
COLOURS = {1: (240, 240, 240), 2: (0, 220, 0)}  # two easy classes: white and green squares


def write_imagefolder(root: Path) -> None:
    """Two classes (bright disc / dark bar) as JPEGs of 120-400 px, RGB, greyscale and CMYK, many with EXIF
    orientation tags."""
    rng = np.random.default_rng(0)
    modes = ("RGB", "L", "CMYK")
    for c, name in enumerate(("disc", "bar")):
        (root / name).mkdir(parents=True)
        for i in range(30):
            w, h = int(rng.integers(120, 400)), int(rng.integers(120, 400))
            yy, xx = np.mgrid[:h, :w]
            if c == 0:
                shape = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2
            else:
                shape = np.abs(yy - h / 2) < h / 8
            pixels = np.where(shape[..., None], 230, 30) + rng.integers(0, 20, (h, w, 3))
            image = Image.fromarray(pixels.astype(np.uint8), "RGB").convert(modes[i % 3])
            exif = Image.Exif()
            exif[EXIF_ORIENTATION] = (1, 3, 6, 8)[i % 4]
            image.save(root / name / f"{i:03d}.jpg", quality=90, exif=exif.tobytes())


def write_coco(root: Path, count: int = 60) -> None:
    """512 px images with one or two large (150-300 px) white or green squares on black: two easy classes."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(count):
        canvas = np.zeros((512, 512, 3), np.uint8)
        for _ in range(int(rng.integers(1, 3))):
            side = int(rng.integers(150, 300))
            x, y = int(rng.integers(0, 512 - side)), int(rng.integers(0, 512 - side))
            if annotations and annotations[-1]["image_id"] == i and _overlaps(annotations[-1]["bbox"], x, y, side):
                continue
            category = int(rng.integers(1, 3))
            canvas[y:y + side, x:x + side] = COLOURS[category]
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": category, "iscrowd": 0,
                                "area": side * side, "bbox": [x, y, side, side],
                                "segmentation": [[x, y, x + side, y, x + side, y + side, x, y + side]]})
        Image.fromarray(canvas).save(root / "images" / f"{i:03d}.jpg", quality=95)
        images.append({"id": i, "file_name": f"{i:03d}.jpg", "height": 512, "width": 512})
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                     "categories": [{"id": 1, "name": "white"},
                                                                    {"id": 2, "name": "green"}]}))


def _overlaps(box: list[int], x: int, y: int, side: int) -> bool:
    bx, by, bw, bh = box
    return not (x >= bx + bw or bx >= x + side or y >= by + bh or by >= y + side)


def write_masks(root: Path, count: int = 30) -> None:
    """Greyscale PNGs of 200x150 with a bright rectangle (class 1) and a mid-grey disc (class 2)."""
    rng = np.random.default_rng(2)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("rect\ndisc\n")
    for i in range(count):
        mask = np.zeros((150, 200), np.uint8)
        x, y = int(rng.integers(0, 100)), int(rng.integers(0, 70))
        mask[y:y + 60, x:x + 80] = 1
        yy, xx = np.mgrid[:150, :200]
        cx, cy = int(rng.integers(30, 170)), int(rng.integers(30, 120))
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 < 25 ** 2] = 2
        image = np.choose(mask, [20, 230, 130]).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")


def repro(tmp_path_factory, name: str, dataset: str, task: str, overrides: dict) -> tuple[Path, dict, float]:
    """A clone with `overrides`, `dvc repro evaluate@<task>`; returns the clone, its metrics and the seconds."""
    root = tmp_path_factory.mktemp(f"own-{name}")
    clone(root)
    set_params(root / "params.yaml", {**ONE_TRIAL, "data.dataset": dataset, **overrides})
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
           "BENTOML_HOME": str(root / ".bentoml")}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.monotonic()
    run(["dvc", "repro", f"evaluate@{task}"], root, env, timeout=600)
    metrics = json.loads((root / f"reports/metrics/{task}.json").read_text())
    return root, metrics, time.monotonic() - started


def one_scene_trial(task: str, family: str, epochs: int) -> dict:
    """Scenes at 64 px and one one-epoch trial of `family` before `epochs` of final training."""
    return {"data.image_size": 64, "augment.crop_size": 16, f"search.{task}.families": [family],
            f"search.{task}.num_samples": 1, f"search.{task}.max_epochs": 1, f"search.{task}.train_subset": None,
            f"train.{task}.epochs": epochs}


def finite(metrics: dict) -> bool:
    return bool(metrics) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())


def test_imagefolder_of_jpegs_with_exif_and_auto_size(tmp_path_factory):
    data = tmp_path_factory.mktemp("photos") / "photos"
    write_imagefolder(data)
    root, metrics, seconds = repro(tmp_path_factory, "imagefolder", f"imagefolder:{data}", "classify", {
        "data.image_size": "auto", "data.auto_size_max": 32, "train.classify.epochs": 3})
    print(f"imagefolder: dvc repro evaluate@classify in {seconds:.0f} s: {metrics}")
    meta = json.loads((root / "data/raw/meta.json").read_text())
    assert meta["image_size"] == [32, 32] and meta["in_channels"] == 3  # auto: min(median shorter side, 32)
    assert meta["splits"] == {"train": 48, "test": 12}
    assert np.load(root / "data/prepared/classify/train/images.npy", mmap_mode="r").shape[1:] == (32, 32, 3)
    assert finite(metrics) and metrics["test_items"] == 12


def test_coco_with_large_objects_reaches_map50(tmp_path_factory):
    data = tmp_path_factory.mktemp("coco") / "coco"
    write_coco(data)
    _, metrics, seconds = repro(tmp_path_factory, "coco", f"coco:{data}", "detect", {
        **one_scene_trial("detect", "faster_rcnn", epochs=10), "train.detect.batch_size": 8,
        "train.detect.lr": 0.002})
    print(f"coco: dvc repro evaluate@detect in {seconds:.0f} s: {metrics}")
    assert finite(metrics) and metrics["test_map_50"] > 0.5


def test_masks_folder(tmp_path_factory):
    data = tmp_path_factory.mktemp("masks") / "seg"
    write_masks(data)
    _, metrics, seconds = repro(tmp_path_factory, "masks", f"masks:{data}", "segment",
                                one_scene_trial("segment", "unet", epochs=2))
    print(f"masks: dvc repro evaluate@segment in {seconds:.0f} s: {metrics}")
    assert finite(metrics)
