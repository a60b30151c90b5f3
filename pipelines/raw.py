"""data/raw, the fetch stage's output: a dataset written with its meta.json, and read back by augment.

Classification sources: {train,test}/images.npy (uint8 [N, H, W, C], written row by row) and
labels.npy (int64 [N]). Own coco/masks data: {train,test}/ in the COCO scene layout (pipelines.coco).
Own data is streamed: one image decoded, resized and written at a time (pipelines.sources.STREAMERS).
meta.json: name, source, kind, classes, in_channels, image_size, splits, checksums, skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipelines import runtime
from pipelines.datasets import ITEMS_DATA, array_info, iter_scenes, save_array, scene_count
from pipelines.decode import bomb_limit
from pipelines.errors import ConvForgeError
from pipelines.params import OWN_DATA_KINDS, DataParams
from pipelines.scenes import Scene
from pipelines.sources import RAW_SPLITS, STREAMERS, ClassifySplits, read_dataset

# The data params that shape data/raw (image_size, on_corrupt and crop sizes act on own data only):
# recorded in meta.json, so the raw data says how it was made whatever the dataset.
SHAPING = {"dataset", "image_size", "auto_size_max", "auto_canvas_max", "on_corrupt", "max_train", "max_test",
           "targets_csv"}
# Shapes own data only and came after the built-in datasets' data/raw: recorded for own data, so a built-in
# dataset's data/raw keeps its bytes.
OWN_SHAPING = {"max_pixels"}


def write_items(dataset: ClassifySplits, out: Path) -> dict:
    """An in-memory classification dataset's arrays into `out/{train,test}/`; returns the raw meta's fields."""
    for split in RAW_SPLITS:
        save_array(out / split / "images.npy", getattr(dataset, f"{split}_images"))
        save_array(out / split / "labels.npy", getattr(dataset, f"{split}_labels").astype(np.int64))
    return {"name": dataset.name, "source": dataset.source, "kind": ITEMS_DATA, "classes": dataset.classes,
            "in_channels": int(dataset.train_images.shape[-1]),
            "image_size": [int(v) for v in dataset.train_images.shape[1:3]],
            "splits": {split: len(getattr(dataset, f"{split}_labels")) for split in RAW_SPLITS},
            "skipped": dataset.skipped}


def write_meta(out: Path, fields: dict, recorded: dict | None = None) -> dict:
    """meta.json of the files in `out` (with their checksums and the `recorded` params); returns it."""
    checksums = {path.relative_to(out).as_posix(): runtime.sha256_file(path)
                 for path in sorted(out.rglob("*")) if path.is_file()}
    meta = {**fields, "checksums": checksums, **({"params": recorded} if recorded else {})}
    runtime.write_json(out / "meta.json", meta)
    return meta


def write_raw(dataset: ClassifySplits, out: Path, recorded: dict | None = None) -> dict:
    """Write an in-memory dataset's files and meta.json into `out`; returns the meta."""
    return write_meta(out, write_items(dataset, out), recorded)


def fetch(data: DataParams, out: Path) -> dict:
    """Read `data.dataset` and write it atomically to `out` (e.g. data/raw); returns the meta.

    Own data is streamed into the staging folder (never a whole split in memory); built-in datasets
    are small and read whole. Image files open under data.max_pixels, Pillow's bomb check included."""
    own = data.kind in OWN_DATA_KINDS
    with runtime.atomic_dir(out) as staging, bomb_limit(data.max_pixels):
        if own:
            fields = STREAMERS[data.kind](data, staging)
        else:
            fields = write_items(read_dataset(data), staging)
        return write_meta(staging, fields, data.model_dump(include=SHAPING | OWN_SHAPING if own else SHAPING))


@dataclass(frozen=True)
class RawData:
    """data/raw read lazily: its meta, and per split the items' files or the scenes one at a time."""

    root: Path
    meta: dict[str, Any]

    @property
    def is_items(self) -> bool:
        """Classification items (images.npy) rather than own coco/masks scenes."""
        return self.meta["kind"] == ITEMS_DATA

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def images_path(self, split: str) -> Path:
        """The split's uint8 [N, H, W, C] .npy (items only)."""
        return self.root / split / "images.npy"

    def labels(self, split: str) -> np.ndarray:
        """The split's int64 labels (items only)."""
        return np.load(self.root / split / "labels.npy").astype(np.int64)

    def count(self, split: str) -> int:
        """Items or scenes in a split."""
        return array_info(self.images_path(split))[0][0] if self.is_items else scene_count(self.root / split)

    def scenes(self, split: str) -> Iterator[Scene]:
        """The split's scenes, one at a time (own coco/masks data)."""
        return iter_scenes(self.root / split)


def load_raw(raw: Path) -> RawData:
    """The fetch stage's output (data/raw), opened for reading (nothing is loaded yet)."""
    meta_path = Path(raw) / "meta.json"
    if not meta_path.is_file():
        raise ConvForgeError(f"{meta_path}: raw data not found (run `dvc repro fetch` first)")
    meta = json.loads(meta_path.read_text())
    if meta["kind"] == ITEMS_DATA and not (Path(raw) / "train" / "images.npy").is_file():
        raise ConvForgeError(f"{raw}: raw data in an older layout; rerun `dvc repro fetch`")
    return RawData(Path(raw), meta)
