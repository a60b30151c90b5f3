"""data/raw, the fetch stage's output: a dataset written with its meta.json, and read back by augment.

Classification sources: {train,test}.npz (images uint8 [N, H, W, C], labels int64).
Own coco/masks data: {train,test}/ in the COCO scene layout (pipelines.coco).
meta.json: name, source, kind, classes, in_channels, image_size, splits, checksums, skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipelines import runtime
from pipelines.coco import read_split, write_split
from pipelines.errors import ConvForgeError
from pipelines.params import DataParams
from pipelines.sources import ClassifySplits, SceneSplits, read_dataset, save_npz
from pipelines.datasets import ITEMS_DATA

RAW_SPLITS = ("train", "test")


# The data params that shape data/raw (image_size, on_corrupt and crop sizes act on own data only):
# recorded in meta.json, so the raw data says how it was made whatever the dataset.
SHAPING = {"dataset", "image_size", "on_corrupt", "max_train", "max_test"}


def write_raw(dataset: ClassifySplits | SceneSplits, out: Path, recorded: dict | None = None) -> dict:
    """Write the dataset's files and meta.json (with the `recorded` params) into `out`; returns the meta."""
    if isinstance(dataset, ClassifySplits):
        save_npz(out / "train.npz", images=dataset.train_images, labels=dataset.train_labels)
        save_npz(out / "test.npz", images=dataset.test_images, labels=dataset.test_labels)
        kind, in_channels = ITEMS_DATA, int(dataset.train_images.shape[-1])
        image_size = [int(v) for v in dataset.train_images.shape[1:3]]
        splits = {"train": len(dataset.train_labels), "test": len(dataset.test_labels)}
    else:
        for split in RAW_SPLITS:
            write_split(out / split, getattr(dataset, split), dataset.classes)
        kind, in_channels = dataset.name, dataset.in_channels
        image_size = list(dataset.train[0].semantic.shape)
        splits = {"train": len(dataset.train), "test": len(dataset.test)}
    checksums = {path.relative_to(out).as_posix(): runtime.sha256_file(path)
                 for path in sorted(out.rglob("*")) if path.is_file()}
    meta = {"name": dataset.name, "source": dataset.source, "kind": kind, "classes": dataset.classes,
            "in_channels": in_channels, "image_size": image_size, "splits": splits,
            "checksums": checksums, "skipped": dataset.skipped, **({"params": recorded} if recorded else {})}
    runtime.write_json(out / "meta.json", meta)
    return meta


def fetch(data: DataParams, out: Path) -> dict:
    """Read `data.dataset` and write it atomically to `out` (e.g. data/raw); returns the meta."""
    dataset = read_dataset(data)
    with runtime.atomic_dir(out) as staging:
        return write_raw(dataset, staging, data.model_dump(include=SHAPING))


def load_raw(raw: Path) -> ClassifySplits | SceneSplits:
    """The fetch stage's output (data/raw) back in memory."""
    meta_path = raw / "meta.json"
    if not meta_path.is_file():
        raise ConvForgeError(f"{meta_path}: raw data not found (run `dvc repro fetch` first)")
    meta = json.loads(meta_path.read_text())
    if meta["kind"] == ITEMS_DATA:
        arrays = {}
        for split in RAW_SPLITS:
            with np.load(raw / f"{split}.npz", allow_pickle=False) as data:
                arrays[split] = (data["images"], data["labels"])
        return ClassifySplits(meta["name"], meta["source"], meta["classes"], *arrays["train"], *arrays["test"],
                              meta.get("skipped", []))
    train, _ = read_split(raw / "train")
    test, _ = read_split(raw / "test")
    return SceneSplits(meta["name"], meta["source"], meta["classes"], train, test, meta["in_channels"],
                       meta.get("skipped", []))
