"""Prepared data (the augment stage's outputs) as in-memory tensors, decoded once.

`load_classify(root, split)` reads `root/{split}.npz`; `load_scenes(root, split)` reads
`root/{split}/images/*.png` and `root/{split}/instances.json` (COCO, RLE masks).
Boxes are float32 xyxy in pixel-edge coordinates (COCO's convention: x2 = x + w, so a
mask covering columns 3..5 has x1 = 3, x2 = 6).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.errors import ConvForgeError

SPLITS = ("train", "val", "test")
# The prepared-data folders under data/prepared, both written by the augment stage: classification
# items, and the scenes composed from them that detection and segmentation share.
ITEMS_DATA, SCENES_DATA = "classify", "scenes"


def _missing(path: Path) -> ConvForgeError:
    return ConvForgeError(f"{path}: prepared data not found (run `dvc repro augment` first)")


def _read_meta(root: Path) -> dict[str, Any]:
    meta_path = Path(root) / "meta.json"
    if not meta_path.is_file():
        raise _missing(meta_path)
    return json.loads(meta_path.read_text())


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConvForgeError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")


def _subset_indices(total: int, n: int, seed: int) -> torch.Tensor:
    """`n` distinct indices out of `total`, drawn with `seed`, in ascending order."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:n].sort().values


class _ImageTensors:
    """What both datasets share: uint8 images [N, C, H, W]."""

    images: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


@dataclass(frozen=True)
class ClassifyData(_ImageTensors):
    """Images uint8 [N, C, H, W], labels int64 [N], class names and train mean/std (in [0, 1] units)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: list[float]
    std: list[float]
    is_copy: torch.Tensor | None = None  # bool [N] on train: materialized augmented copies

    def subset(self, n: int | None, seed: int) -> "ClassifyData":
        """A random subset of `n` items (all of them when n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        idx = _subset_indices(len(self), n, seed)
        return replace(self, images=self.images[idx], labels=self.labels[idx],
                       is_copy=None if self.is_copy is None else self.is_copy[idx])


def load_classify(root: Path, split: str) -> ClassifyData:
    """Load `root/{split}.npz` (e.g. root = data/prepared/classify) as tensors."""
    _check_split(split)
    root = Path(root)
    meta = _read_meta(root)
    path = root / f"{split}.npz"
    if not path.is_file():
        raise _missing(path)
    with np.load(path, allow_pickle=False) as arrays:
        images = torch.from_numpy(np.ascontiguousarray(arrays["images"].transpose(0, 3, 1, 2)))
        labels = torch.from_numpy(arrays["labels"].astype(np.int64))
        is_copy = torch.from_numpy(arrays["is_copy"]) if "is_copy" in arrays.files else None
    return ClassifyData(images, labels, list(meta["classes"]), list(meta["mean"]), list(meta["std"]), is_copy)


@dataclass(frozen=True)
class SceneData(_ImageTensors):
    """Scene images uint8 [N, C, H, W], semantic masks uint8 [N, H, W] (0 = background, c + 1 = class c),
    per-image targets {"boxes" float32 [k, 4] xyxy, "labels" int64 [k] (0..C-1), "masks" uint8 [k, H, W]}."""

    images: torch.Tensor
    masks: torch.Tensor
    targets: list[dict[str, torch.Tensor]]
    classes: list[str]
    mean: list[float]
    std: list[float]
    image_ids: list[int] = field(default_factory=list)

    def subset(self, n: int | None, seed: int) -> "SceneData":
        """A random subset of `n` scenes (all of them when n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        idx = _subset_indices(len(self), n, seed)
        keep = idx.tolist()
        return replace(self, images=self.images[idx], masks=self.masks[idx],
                       targets=[self.targets[i] for i in keep],
                       image_ids=[self.image_ids[i] for i in keep] if self.image_ids else [])


def load_scenes(root: Path, split: str) -> SceneData:
    """Load `root/{split}/` (e.g. root = data/prepared/scenes): PNG images, semantic masks, COCO instances."""
    from pipelines.coco import read_instances  # pycocotools only when scenes are used

    _check_split(split)
    root = Path(root)
    meta = _read_meta(root)
    folder = root / split
    if not (folder / "instances.json").is_file():
        raise _missing(folder / "instances.json")
    scenes = read_instances(folder)
    channels = int(meta["in_channels"])
    images = torch.stack([_to_chw(scene.image, channels) for scene in scenes]) if scenes else \
        torch.zeros((0, channels, meta["image_size"], meta["image_size"]), dtype=torch.uint8)
    masks = torch.stack([torch.from_numpy(scene.semantic) for scene in scenes]) if scenes else \
        torch.zeros((0, meta["image_size"], meta["image_size"]), dtype=torch.uint8)
    targets = [{
        "boxes": torch.from_numpy(scene.boxes.astype(np.float32)).reshape(-1, 4),
        "labels": torch.from_numpy(scene.labels.astype(np.int64)),
        "masks": torch.from_numpy(scene.instance_masks.astype(np.uint8)),
    } for scene in scenes]
    return SceneData(images, masks, targets, list(meta["classes"]), list(meta["mean"]), list(meta["std"]),
                     [scene.image_id for scene in scenes])


def _to_chw(image: np.ndarray, channels: int) -> torch.Tensor:
    array = image if image.ndim == 3 else image[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array[:, :, :channels].transpose(2, 0, 1)))
