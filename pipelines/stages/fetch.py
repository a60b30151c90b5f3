"""Stage `fetch`: the dataset named by `data.dataset` -> data/raw/ with meta.json.

Classification sources: data/raw/{train,test}.npz (images uint8 [N, H, W, C], labels int64).
Own coco/masks data: data/raw/{train,test}/ in the COCO scene layout (pipelines.coco).
meta.json: name, source, kind, classes, in_channels, image_size, splits, checksums, skipped.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipelines import runtime
from pipelines.coco import write_split
from pipelines.errors import stage_entry
from pipelines.params import DataParams, load_params
from pipelines.sources import ClassifySplits, SceneSplits, read_dataset, save_npz


def write_raw(dataset: ClassifySplits | SceneSplits, out: Path) -> dict:
    """Write the dataset's files and meta.json into `out`; returns the meta."""
    if isinstance(dataset, ClassifySplits):
        save_npz(out / "train.npz", images=dataset.train_images, labels=dataset.train_labels)
        save_npz(out / "test.npz", images=dataset.test_images, labels=dataset.test_labels)
        kind, in_channels = "classify", int(dataset.train_images.shape[-1])
        image_size = [int(v) for v in dataset.train_images.shape[1:3]]
        splits = {"train": len(dataset.train_labels), "test": len(dataset.test_labels)}
    else:
        for split in ("train", "test"):
            write_split(out / split, getattr(dataset, split), dataset.classes)
        kind, in_channels = dataset.name, dataset.in_channels
        image_size = list(dataset.train[0].semantic.shape)
        splits = {"train": len(dataset.train), "test": len(dataset.test)}
    checksums = {path.relative_to(out).as_posix(): runtime.sha256_file(path)
                 for path in sorted(out.rglob("*")) if path.is_file()}
    meta = {"name": dataset.name, "source": dataset.source, "kind": kind, "classes": dataset.classes,
            "in_channels": in_channels, "image_size": image_size, "splits": splits,
            "checksums": checksums, "skipped": dataset.skipped}
    runtime.write_json(out / "meta.json", meta)
    return meta


def fetch(data: DataParams, out: Path) -> dict:
    """Read `data.dataset` and write it atomically to `out` (e.g. data/raw)."""
    dataset = read_dataset(data)
    with runtime.atomic_dir(out) as staging:
        return write_raw(dataset, staging)


@stage_entry
def main() -> None:
    params = load_params()
    started = time.perf_counter()
    meta = fetch(params.data, Path("data/raw"))
    skipped = f", skipped {len(meta['skipped'])} unreadable image(s)" if meta["skipped"] else ""
    print(f"fetch: {meta['name']} from {meta['source']}: {meta['splits']} items, {len(meta['classes'])} classes, "
          f"{meta['in_channels']} channel(s), {meta['image_size']} px{skipped} "
          f"-> data/raw in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
