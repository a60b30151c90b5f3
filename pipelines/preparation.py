"""Prepared data from data/raw: data/prepared/{classify,scenes} and the previews of the augment stage.

Classify: stratified train/val split (seeded), mean/std from train only, `augment.copies`
materialized augmented copies. Scenes: composed from the classify items of the SAME split
(train scenes from train items, val from val, test from test), so no item leaks. For own
coco/masks data the raw scenes are split and copied, and the classify set holds instance crops.
Same params and seed give byte-identical outputs. Everything streams: raw items are read in
blocks, raw scenes one at a time, and every output is written as it is made (pipelines.datasets
writers), so memory stays flat whatever the dataset's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipelines import runtime
from pipelines.coco import write_split
from pipelines.datasets import (ITEMS_DATA, SCENES_DATA, ArrayWriter, RowReader, SceneWriter, read_rows, row_blocks,
                                save_array)
from pipelines.drawing import class_colors, draw_detections, save_grid
from pipelines.errors import ConvForgeError
from pipelines.params import AugmentParams, SceneParams
from pipelines.raw import RawData
from pipelines.scenes import Scene, compose_scenes, too_many_classes
from pipelines.transforms import apply_policy, build_policy

SPLITS = ("train", "val", "test")


def stratified_split(labels: np.ndarray, val_fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices; each class gives round(val_fraction * its count) items to val."""
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        count = int(round(val_fraction * len(members)))
        val.append(rng.permutation(members)[:count])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels)), val_idx), val_idx


def require_every_split(counts: dict[str, int], dataset: str) -> None:
    """Stop with one line when a split is empty: training would end in a traceback on an empty val or test set
    (a class of up to 5 training items gives val none: round(0.1 x 5) = 0)."""
    empty = [split for split in SPLITS if not counts.get(split)]
    if empty:
        raise ConvForgeError(f"the {dataset} set's {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} "
                             f"empty ({', '.join(f'{split} {counts.get(split, 0)}' for split in SPLITS)}): add "
                             "images, or raise augment.val_fraction for val")


class ChannelHistogram:
    """Per-channel value histograms of uint8 images, added block by block: exact mean/std of a whole split."""

    def __init__(self) -> None:
        self.hist: np.ndarray | None = None

    def add(self, images: np.ndarray) -> None:
        """Count the values of uint8 [N, H, W, C] (or one [H, W, C])."""
        channels = images.shape[-1]
        counts = np.stack([np.bincount(images[..., c].ravel(), minlength=256) for c in range(channels)])
        self.hist = counts if self.hist is None else self.hist + counts

    def stats(self, channels: int) -> tuple[list[float], list[float]]:
        """Mean and std per channel in [0, 1] units (0 and 1 for a channel with no pixels)."""
        values = np.arange(256, dtype=np.float64) / 255.0
        hist = self.hist if self.hist is not None else np.zeros((channels, 256), np.int64)
        mean, std = [], []
        for c in range(channels):
            counts = hist[c].astype(np.float64)
            total = max(counts.sum(), 1.0)
            m = float((counts * values).sum() / total)
            mean.append(round(m, 6))
            std.append(round(float(np.sqrt(max((counts * values ** 2).sum() / total - m * m, 0.0))), 6) or 1.0)
        return mean, std


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of uint8 [N, H, W, C], exact, from value histograms."""
    histogram = ChannelHistogram()
    histogram.add(images)
    return histogram.stats(images.shape[-1])


def _chw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _hwc(images: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(images.numpy().transpose(0, 2, 3, 1))


def append_copies(path: Path, originals: int, params: AugmentParams, seed: int, rows: int = 256) -> int:
    """`params.copies` augmented copies of the first `originals` rows appended to the .npy at `path`
    (policy at strength 1), block by block; returns the rows added.

    Copy k seeds the torch RNG once and runs through every image in order, exactly as
    `apply_policy(policy, all_images, seed * 1000 + k + 1)` would: same bytes, a block in memory."""
    if params.copies == 0 or originals == 0:
        return 0
    shape = read_rows(path, 0, 1).shape
    policy = build_policy(params.policy, shape[1], shape[-1])
    with ArrayWriter.reopen(path) as writer:
        for k in range(params.copies):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1000 + k + 1)
                for start in range(0, originals, rows):
                    block = _chw(read_rows(path, start, min(start + rows, originals)))
                    writer.append(_hwc(torch.stack([policy(image) for image in block])))
    return params.copies * originals


class ItemsWriter:
    """data/prepared/classify written split by split as items arrive: {split}/images.npy and labels.npy,
    train/is_copy.npy, meta.json (mean/std from the original train items only)."""

    def __init__(self, out: Path, row_shape: tuple[int, ...]):
        self.out, self.row_shape = out, row_shape
        self.writers = {split: ArrayWriter(out / split / "images.npy", row_shape) for split in SPLITS}
        self.labels: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
        self.histogram = ChannelHistogram()

    def add(self, split: str, images: np.ndarray, labels: np.ndarray) -> None:
        """Items uint8 [n, H, W, C] with their labels, appended to `split`."""
        if len(images) == 0:
            return
        self.writers[split].append(images)
        self.labels[split].append(np.asarray(labels, dtype=np.int64))
        if split == "train":
            self.histogram.add(images)

    def finish(self, classes: list[str], params: AugmentParams, seed: int, note: str | None = None,
               source_size: dict[str, float] | None = None) -> dict:
        """Close the splits, append the train copies, write labels, is_copy and meta.json; returns the meta.
        `source_size`: the training photos' own size (own data; see `with_source_size`)."""
        counts = {split: writer.close() for split, writer in self.writers.items()}
        labels = {split: np.concatenate(parts) if parts else np.zeros(0, np.int64)
                  for split, parts in self.labels.items()}
        copies = append_copies(self.out / "train" / "images.npy", counts["train"], params, seed)
        save_array(self.out / "train" / "labels.npy", np.concatenate([labels["train"]] + [labels["train"]] *
                                                                     params.copies if copies else [labels["train"]]))
        save_array(self.out / "train" / "is_copy.npy",
                   np.concatenate([np.zeros(counts["train"], bool), np.ones(copies, bool)]))
        for split in ("val", "test"):
            save_array(self.out / split / "labels.npy", labels[split])
        mean, std = self.histogram.stats(self.row_shape[-1])
        meta = {"classes": classes, "in_channels": int(self.row_shape[-1]), "image_size": int(self.row_shape[0]),
                "mean": mean, "std": std, "policy": params.policy.model_dump(), "augment": params.model_dump(),
                "seed": seed, "counts": {"train": counts["train"], "copies": copies, "val": counts["val"],
                                         "test": counts["test"]}}
        if note:
            meta["note"] = note
        meta = with_source_size(meta, source_size)
        runtime.write_json(self.out / "meta.json", meta)
        return meta


def with_source_size(meta: dict, source_size: dict[str, float] | None) -> dict:
    """`meta` with the training images' own size, when the raw data has one: own photos ({"side": median
    sqrt(width x height) in px, "aspect": median width / height} of the train split, as fetch read them), which the
    service's domain check compares uploads with. Built-in datasets have none: their items are at the working
    size."""
    return {**meta, "source_size": source_size} if source_size else meta


def scenes_meta(classes: list[str], in_channels: int, image_size: int, histogram: ChannelHistogram,
                counts: dict[str, int], instances: dict[str, int]) -> dict:
    """meta.json of data/prepared/scenes (mean/std from the train scenes)."""
    mean, std = histogram.stats(in_channels)
    return {"classes": classes, "in_channels": in_channels, "image_size": image_size, "mean": mean, "std": std,
            "counts": counts | {f"{split}_instances": instances[split] for split in SPLITS}}


def write_scenes(out: Path, scenes: dict[str, list[Scene]], classes: list[str], in_channels: int,
                 image_size: int) -> dict:
    """Write composed scene splits (COCO + PNGs, small canvases) and meta.json (mean/std from train scenes)."""
    histogram = ChannelHistogram()
    for split in SPLITS:
        write_split(out / split, scenes[split], classes)
    for scene in scenes["train"]:
        histogram.add(scene.image)
    meta = scenes_meta(classes, in_channels, image_size, histogram, {split: len(scenes[split]) for split in SPLITS},
                       {split: int(sum(len(s.labels) for s in scenes[split])) for split in SPLITS})
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


def _select_blocks(path: Path, keep: np.ndarray):
    """Blocks of the rows `keep` (ascending) of an .npy file, read block by block."""
    for start, block in row_blocks(path):
        chosen = keep[(keep >= start) & (keep < start + len(block))]
        if len(chosen):
            yield chosen, block[chosen - start]


def prepare_from_classify(raw: RawData, prepared: Path, reports: Path, augment: AugmentParams,
                          scenes: SceneParams, seed: int) -> None:
    """Classify splits and scenes composed from them (see module docstring)."""
    train_labels, test_labels = raw.labels("train"), raw.labels("test")
    train_idx, val_idx = stratified_split(train_labels, augment.val_fraction, np.random.default_rng(seed))
    require_every_split({"train": len(train_idx), "val": len(val_idx), "test": len(test_labels)}, ITEMS_DATA)
    shape = read_rows(raw.images_path("train"), 0, 1).shape[1:]
    # Both sets swap into place together (scenes inside classify): a stopped run leaves the old pair, never a new
    # classify set beside the old scenes.
    with runtime.atomic_dir(prepared / ITEMS_DATA) as out, runtime.atomic_dir(prepared / SCENES_DATA) as scenes_out:
        items = ItemsWriter(out, shape)
        for split, keep in (("train", train_idx), ("val", val_idx)):
            for rows, block in _select_blocks(raw.images_path("train"), keep):
                items.add(split, block, train_labels[rows])
        for start, block in row_blocks(raw.images_path("test")):
            items.add("test", block, test_labels[start:start + len(block)])
        items_meta = items.finish(raw.classes, augment, seed, source_size=raw.meta.get("source_size"))
        if raw.meta.get("target_names"):  # data.targets_csv: the regress task's own targets
            from pipelines.targets import write_targets

            write_targets(raw.root, out, {"train": train_idx, "val": val_idx}, augment.copies, raw.meta["target_names"])
        # Scenes draw items at random: one pread per item from the written splits (no split held in memory).
        labels = {"train": train_labels[train_idx], "val": train_labels[val_idx], "test": test_labels}
        sources = {"train": [f"train/{i}" for i in train_idx], "val": [f"train/{i}" for i in val_idx],
                   "test": [f"test/{i}" for i in range(len(test_labels))]}
        counts = {"train": scenes.train_scenes, "val": scenes.val_scenes, "test": scenes.test_scenes}
        unavailable = too_many_classes(len(raw.classes))
        if unavailable:  # classify (and regress, reconstruct) still train; detect and segment say why they cannot
            composed = {split: [] for split in SPLITS}
            runtime.write_json(scenes_out / "meta.json", {"unavailable": unavailable})
            scenes_counts = f"none ({unavailable})"
        else:
            composed = {split: compose_scenes(RowReader(out / split / "images.npy", len(labels[split])),
                                              labels[split], sources[split], counts[split], scenes,
                                              np.random.default_rng([seed, n]), progress=f"compose {split} scenes")
                        for n, split in enumerate(SPLITS)}
            scenes_counts = write_scenes(scenes_out, composed, raw.classes, int(shape[-1]),
                                         scenes.canvas_size)["counts"]
    preview_items = read_rows(prepared / ITEMS_DATA / "train" / "images.npy", 0, augment.preview_count)
    _write_previews(reports, preview_items, composed["train"], raw.classes, augment, seed)
    print(f"{ITEMS_DATA}: {items_meta['counts']}  {SCENES_DATA}: {scenes_counts}")


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


def _own_scenes(raw: RawData, seed: int, val_fraction: float):
    """(split, scene) for every raw scene in order: raw train split into train/val (seeded), test kept."""
    order = np.random.default_rng(seed).permutation(raw.count("train"))
    val_ids = set(order[:int(round(val_fraction * len(order)))].tolist())
    for i, scene in enumerate(raw.scenes("train")):
        yield ("val" if i in val_ids else "train"), scene
    for scene in raw.scenes("test"):
        yield "test", scene


def prepare_from_scenes(raw: RawData, prepared: Path, reports: Path, augment: AugmentParams, seed: int) -> None:
    """Own coco/masks data: raw train split into train/val (seeded), test kept; classify = instance crops.

    One pass over the raw scenes, one scene in memory at a time: each is copied into its prepared
    split and its instance crops appended to the classify split of the same name."""
    channels, canvas = int(raw.meta["in_channels"]), int(raw.meta["image_size"][0])
    histogram, previews = ChannelHistogram(), []
    instances = {split: 0 for split in SPLITS}
    with runtime.atomic_dir(prepared / ITEMS_DATA) as items_out, \
         runtime.atomic_dir(prepared / SCENES_DATA) as scenes_out:
        items = ItemsWriter(items_out, (augment.crop_size, augment.crop_size, channels))
        writers = {split: SceneWriter(scenes_out / split, raw.classes) for split in SPLITS}
        for split, scene in _own_scenes(raw, seed, augment.val_fraction):
            writers[split].add(scene)
            items.add(split, *instance_crops([scene], augment.crop_size))
            instances[split] += len(scene.labels)
            if split == "train":
                histogram.add(scene.image)
                if len(previews) < 16:
                    previews.append(scene)
        for writer in writers.values():
            writer.close()
        if items.writers["train"].count == 0:
            raise ConvForgeError("the training images have no instances to crop for the classify set")
        require_every_split({split: writers[split].count for split in SPLITS}, SCENES_DATA)
        require_every_split({split: items.writers[split].count for split in SPLITS}, ITEMS_DATA)
        items_meta = items.finish(raw.classes, augment, seed,
                                  note=f"classify items are instance crops ({augment.crop_size} px) of the "
                                       f"{raw.meta['name']} scenes")
        scenes_written = with_source_size(scenes_meta(raw.classes, channels, canvas, histogram,
                                                      {split: writers[split].count for split in SPLITS}, instances),
                                          raw.meta.get("source_size"))
        runtime.write_json(scenes_out / "meta.json", scenes_written)
    preview_items = read_rows(prepared / ITEMS_DATA / "train" / "images.npy", 0, augment.preview_count)
    _write_previews(reports, preview_items, previews, raw.classes, augment, seed)
    print(f"{ITEMS_DATA}: {items_meta['counts']}  {SCENES_DATA}: {scenes_written['counts']}")


def _write_previews(reports: Path, items: np.ndarray, scenes: list[Scene], classes: list[str],
                    augment: AugmentParams, seed: int) -> None:
    with runtime.atomic_dir(reports) as out:
        preview_classify(out / f"{ITEMS_DATA}_preview.png", items, augment, seed)
        preview_scenes(out / f"{SCENES_DATA}_preview.png", scenes, classes)
