"""Prepared data from data/raw: data/prepared/{classify,scenes} and the previews of the augment stage.

Classify: stratified train/val split (seeded), mean/std from train only, `augment.copies`
materialized augmented copies. Scenes: composed from the classify items of the SAME split
(train scenes from train items, val from val, test from test), so no item leaks. For own
coco/masks data the raw scenes are split and copied, and the classify set holds instance crops.
Same params and seed give byte-identical outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipelines import runtime
from pipelines.coco import write_split
from pipelines.drawing import class_colors, draw_detections, save_grid
from pipelines.errors import ConvForgeError
from pipelines.params import AugmentParams, SceneParams
from pipelines.scenes import Scene, compose_scenes
from pipelines.sources import ClassifySplits, SceneSplits, save_npz
from pipelines.datasets import ITEMS_DATA, SCENES_DATA
from pipelines.transforms import apply_policy, build_policy

SPLITS = ("train", "val", "test")


def stratified_split(labels: np.ndarray, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices; each class gives round(val_fraction * its count) items to val."""
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        count = int(round(val_fraction * len(members)))
        val.append(rng.permutation(members)[:count])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels)), val_idx), val_idx


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of uint8 [N, H, W, C], exact, from value histograms."""
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(images.shape[-1]):
        hist = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
        total = max(hist.sum(), 1.0)
        m = float((hist * values).sum() / total)
        mean.append(round(m, 6))
        std.append(round(float(np.sqrt(max((hist * values ** 2).sum() / total - m * m, 0.0))), 6) or 1.0)
    return mean, std


def _chw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _hwc(images: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(images.numpy().transpose(0, 2, 3, 1))


def materialize_copies(images: np.ndarray, labels: np.ndarray, params: AugmentParams,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`params.copies` augmented copies of every image (policy at strength 1), seeded per copy."""
    if params.copies == 0 or len(images) == 0:
        return images[:0], labels[:0]
    policy = build_policy(params.policy, images.shape[1], images.shape[-1])
    copies = [_hwc(apply_policy(policy, _chw(images), seed=seed * 1000 + k + 1)) for k in range(params.copies)]
    return np.concatenate(copies), np.tile(labels, params.copies)


def write_classify(out: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str],
                   params: AugmentParams, seed: int, note: str | None = None) -> dict:
    """Write {train,val,test}.npz and meta.json (stats from the original train images only)."""
    train_x, train_y = splits["train"]
    mean, std = channel_stats(train_x)
    copy_x, copy_y = materialize_copies(train_x, train_y, params, seed)
    is_copy = np.concatenate([np.zeros(len(train_x), bool), np.ones(len(copy_x), bool)])
    save_npz(out / "train.npz", images=np.concatenate([train_x, copy_x]),
             labels=np.concatenate([train_y, copy_y]).astype(np.int64), is_copy=is_copy)
    for split in ("val", "test"):
        save_npz(out / f"{split}.npz", images=splits[split][0], labels=splits[split][1].astype(np.int64))
    meta = {"classes": classes, "in_channels": int(train_x.shape[-1]), "image_size": int(train_x.shape[1]),
            "mean": mean, "std": std, "policy": params.policy.model_dump(), "augment": params.model_dump(), "seed": seed,
            "counts": {"train": int(len(train_x)), "copies": int(len(copy_x)),
                       "val": int(len(splits["val"][0])), "test": int(len(splits["test"][0]))}}
    if note:
        meta["note"] = note
    runtime.write_json(out / "meta.json", meta)
    return meta


def write_scenes(out: Path, scenes: dict[str, list[Scene]], classes: list[str], in_channels: int,
                 image_size: int) -> dict:
    """Write the scene splits (COCO + PNGs) and meta.json (mean/std from train scenes)."""
    for split in SPLITS:
        write_split(out / split, scenes[split], classes)
    train_images = np.stack([s.image for s in scenes["train"]]) if scenes["train"] else \
        np.zeros((0, image_size, image_size, in_channels), np.uint8)
    mean, std = channel_stats(train_images)
    meta = {"classes": classes, "in_channels": in_channels, "image_size": image_size, "mean": mean, "std": std,
            "counts": {split: len(scenes[split]) for split in SPLITS} |
            {f"{split}_instances": int(sum(len(s.labels) for s in scenes[split])) for split in SPLITS}}
    runtime.write_json(out / "meta.json", meta)
    return meta


def preview_classify(path: Path, images: np.ndarray, params: AugmentParams, seed: int, nrow: int = 8) -> None:
    """Rows of original training images, each followed by a row of the same images augmented."""
    count = min(len(images), max(1, params.preview_count // 2))
    originals = _chw(images[:count])
    augmented = apply_policy(build_policy(params.policy, images.shape[1], images.shape[-1]), originals, seed)
    tiles = []
    for start in range(0, count, nrow):
        tiles += list(originals[start:start + nrow]) + list(augmented[start:start + nrow])
    scale = max(1, 64 // images.shape[1])
    save_grid(tiles, path, nrow=min(nrow, count), scale=scale)


def preview_scenes(path: Path, scenes: list[Scene], classes: list[str], count: int = 16) -> None:
    """Scenes with their instance masks and labelled boxes drawn."""
    drawn = []
    for scene in scenes[:count]:
        image = torch.from_numpy(np.ascontiguousarray(scene.image.transpose(2, 0, 1)))
        scale = max(1, 256 // image.shape[-1])
        drawn.append(draw_detections(image, torch.from_numpy(scene.boxes), [classes[c] for c in scene.labels],
                                     masks=torch.from_numpy(scene.instance_masks), scale=scale,
                                     colors=class_colors(classes)))
    if drawn:
        save_grid(drawn, path, nrow=4)


def prepare_from_classify(raw: ClassifySplits, prepared: Path, reports: Path, augment: AugmentParams,
                          scenes: SceneParams, seed: int) -> None:
    """Classify splits and scenes composed from them (see module docstring)."""
    train_idx, val_idx = stratified_split(raw.train_labels, augment.val_fraction, np.random.default_rng(seed))
    splits = {"train": (raw.train_images[train_idx], raw.train_labels[train_idx]),
              "val": (raw.train_images[val_idx], raw.train_labels[val_idx]),
              "test": (raw.test_images, raw.test_labels)}
    sources = {"train": [f"train/{i}" for i in train_idx], "val": [f"train/{i}" for i in val_idx],
               "test": [f"test/{i}" for i in range(len(raw.test_labels))]}
    counts = {"train": scenes.train_scenes, "val": scenes.val_scenes, "test": scenes.test_scenes}
    composed = {split: compose_scenes(*splits[split], sources[split], counts[split], scenes,
                                      np.random.default_rng([seed, n]), progress=f"compose {split} scenes")
                for n, split in enumerate(SPLITS)}
    _write_all(prepared, reports, splits, composed, raw.classes, augment, seed, scenes.canvas_size)


def instance_crops(scenes: list[Scene], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Square crops (10% margin, zero padded) around each instance's box, resized to size x size."""
    crops, labels = [], []
    for scene in scenes:
        h, w, channels = scene.image.shape
        padded = np.zeros((3 * h, 3 * w, channels), np.uint8)
        padded[h:2 * h, w:2 * w] = scene.image
        for (x1, y1, x2, y2), label in zip(scene.boxes, scene.labels):
            side = max(2, int(np.ceil(max(x2 - x1, y2 - y1) * 1.1)))
            cx, cy = (x1 + x2) / 2 + w, (y1 + y2) / 2 + h
            x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
            crop = padded[max(0, y0):y0 + side, max(0, x0):x0 + side]
            crops.append(_resized_to(crop, size))
            labels.append(int(label))
    if not crops:
        return np.zeros((0, size, size, scenes[0].image.shape[-1] if scenes else 1), np.uint8), np.zeros(0, np.int64)
    return np.stack(crops), np.array(labels, dtype=np.int64)


def _resized_to(image: np.ndarray, size: int) -> np.ndarray:
    from torchvision.transforms.v2 import functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return F.resize(tensor, [size, size], antialias=True).numpy().transpose(1, 2, 0)


def prepare_from_scenes(raw: SceneSplits, prepared: Path, reports: Path, augment: AugmentParams,
                        seed: int) -> None:
    """Own coco/masks data: raw train split into train/val (seeded), test kept; classify = instance crops."""
    order = np.random.default_rng(seed).permutation(len(raw.train))
    n_val = int(round(augment.val_fraction * len(raw.train)))
    val_ids = set(order[:n_val].tolist())
    composed = {"train": [s for i, s in enumerate(raw.train) if i not in val_ids],
                "val": [s for i, s in enumerate(raw.train) if i in val_ids], "test": list(raw.test)}
    for split in SPLITS:
        for image_id, scene in enumerate(composed[split], start=1):
            scene.image_id = image_id
    splits = {split: instance_crops(composed[split], augment.crop_size) for split in SPLITS}
    if len(splits["train"][0]) == 0:
        raise ConvForgeError("the training images have no instances to crop for the classify set")
    image_size = raw.train[0].image.shape[0]
    _write_all(prepared, reports, splits, composed, raw.classes, augment, seed, image_size,
               note=f"classify items are instance crops ({augment.crop_size} px) of the {raw.name} scenes")


def _write_all(prepared: Path, reports: Path, splits: dict, composed: dict[str, list[Scene]], classes: list[str],
               augment: AugmentParams, seed: int, canvas: int, note: str | None = None) -> None:
    in_channels = int(splits["train"][0].shape[-1])
    with runtime.atomic_dir(prepared / ITEMS_DATA) as out:
        items_meta = write_classify(out, splits, classes, augment, seed, note)
    with runtime.atomic_dir(prepared / SCENES_DATA) as out:
        scenes_meta = write_scenes(out, composed, classes, in_channels, canvas)
    with runtime.atomic_dir(reports) as out:
        preview_classify(out / f"{ITEMS_DATA}_preview.png", splits["train"][0], augment, seed)
        preview_scenes(out / f"{SCENES_DATA}_preview.png", composed["train"], classes)
    print(f"{ITEMS_DATA}: {items_meta['counts']}  {SCENES_DATA}: {scenes_meta['counts']}")
