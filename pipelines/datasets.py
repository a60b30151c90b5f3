"""Prepared data (the augment stage's outputs): uint8 arrays on disk, read in memory when small, lazily when not.

Classification splits are `.npy` files written row by row (`ArrayWriter`: the header is fixed-size
and rewritten at the end, so no split is ever held whole while it is written) and read with
`np.load(mmap_mode="r")`. `load_classify(root, split)` reads `root/{split}/images.npy` (uint8
[N, H, W, C]) and `labels.npy`; `load_scenes(root, split)` reads `root/{split}/images/*.png`,
`masks/*.png` and `instances.json` (COCO, RLE masks). A split under `IN_MEMORY_BYTES` is loaded
as tensors (the engine slices them: the fast path of Fashion-MNIST and digits); a larger one is
a `LazyRows` view whose items are read when indexed, by the engine's DataLoader workers.
Boxes are float32 xyxy in pixel-edge coordinates (COCO's convention: x2 = x + w, so a
mask covering columns 3..5 has x1 = 3, x2 = 6).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipelines.errors import ConvForgeError

SPLITS = ("train", "val", "test")
# The prepared-data folders under data/prepared, both written by the augment stage: classification
# items, and the scenes composed from them that detection and segmentation share.
ITEMS_DATA, SCENES_DATA = "classify", "scenes"
# Splits up to this size load as tensors: slicing them beats any reader, and a 60k x 28 x 28 split is 47 MB.
IN_MEMORY_BYTES = 256 * 2**20
NPY_HEADER_BYTES = 128  # fixed, so the final row count is written over the first header in place


# ---------------------------------------------------------------- array files (.npy, streamed)


def _npy_header(shape: Sequence[int], dtype: np.dtype) -> bytes:
    """A format-1.0 .npy header of exactly NPY_HEADER_BYTES bytes (padded with spaces, as numpy does)."""
    from numpy.lib import format as npy_format

    text = repr({"descr": npy_format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                 "shape": tuple(int(v) for v in shape)})
    prefix = npy_format.magic(1, 0)
    body = text.encode("latin1").ljust(NPY_HEADER_BYTES - len(prefix) - 3) + b"\n"
    return prefix + len(body).to_bytes(2, "little") + body


class ArrayWriter:
    """An .npy file written row block by row block (`append`), its row count set at `close`.

    Plain file writes, no memory map: the process holds one block at a time, whatever the split's size.
    """

    def __init__(self, path: Path, row_shape: Sequence[int], dtype: Any = np.uint8):
        self.path, self.row_shape, self.dtype, self.count = Path(path), tuple(row_shape), np.dtype(dtype), 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb")
        self._file.write(_npy_header((0, *self.row_shape), self.dtype))

    def append(self, rows: np.ndarray) -> None:
        """Add rows [n, *row_shape] (or one row [*row_shape])."""
        rows = np.asarray(rows, dtype=self.dtype)
        if rows.shape == self.row_shape:
            rows = rows[None]
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path}: rows of shape {rows.shape[1:]}, expected {self.row_shape}")
        self._file.write(np.ascontiguousarray(rows).tobytes())
        self.count += len(rows)

    @classmethod
    def reopen(cls, path: Path) -> "ArrayWriter":
        """A closed array file opened again to append rows after its last one."""
        shape, dtype, _ = array_info(path)
        writer = object.__new__(cls)
        writer.path, writer.row_shape, writer.dtype, writer.count = Path(path), shape[1:], dtype, shape[0]
        writer._file = open(path, "r+b")
        writer._file.seek(0, os.SEEK_END)
        return writer

    def close(self) -> int:
        """Write the final header; returns the row count."""
        if not self._file.closed:
            self._file.seek(0)
            self._file.write(_npy_header((self.count, *self.row_shape), self.dtype))
            self._file.close()
        return self.count

    def __enter__(self) -> "ArrayWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def save_array(path: Path, array: np.ndarray) -> None:
    """A whole array as .npy (same bytes as streaming it row by row)."""
    array = np.asarray(array)
    with ArrayWriter(path, array.shape[1:], array.dtype) as writer:
        writer.append(array)


def array_info(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of an .npy file, from its header."""
    from numpy.lib import format as npy_format

    with open(path, "rb") as handle:
        npy_format.read_magic(handle)  # ArrayWriter writes format 1.0
        shape, _, dtype = npy_format.read_array_header_1_0(handle)
        return tuple(shape), dtype, handle.tell()


def read_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of an .npy file read into memory (a plain read: no pages stay mapped)."""
    shape, dtype, offset = array_info(path)
    stop = min(stop, shape[0])
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    with open(path, "rb") as handle:
        handle.seek(offset + start * row)
        data = np.fromfile(handle, dtype=dtype, count=max(0, stop - start) * row // dtype.itemsize)
    return data.reshape(-1, *shape[1:])


BLOCK_BYTES = 16 * 2**20  # a block of rows read at a time: large enough for fast reads, small beside RAM


def row_blocks(path: Path, rows: int | None = None):
    """(start, block) pairs over an .npy file, `rows` rows (default: BLOCK_BYTES' worth) at a time."""
    shape, dtype, _ = array_info(path)
    total = shape[0]
    rows = rows or max(1, BLOCK_BYTES // max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize))
    for start in range(0, total, rows):
        yield start, read_rows(path, start, start + rows)


class RowReader:
    """Random access to the rows of an .npy file with one pread each (no memory map: RSS stays flat);
    `count` limits it to the first rows."""

    def __init__(self, path: Path, count: int | None = None):
        self.path = Path(path)
        self.shape, self.dtype, self.offset = array_info(self.path)
        if count is not None:
            self.shape = (min(count, self.shape[0]), *self.shape[1:])
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, self.row_bytes, self.offset + int(i) * self.row_bytes)
        finally:
            os.close(fd)
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape[1:]).copy()


# ---------------------------------------------------------------- scene folders, one scene at a time


class SceneWriter:
    """A split folder in the COCO scene layout (pipelines.coco) written one scene at a time: PNGs at
    once, annotations kept (RLE, small) for instances.json at `close`. Image ids are 1, 2, ... in order;
    the bytes equal `pipelines.coco.write_split` of the same scenes."""

    def __init__(self, folder: Path, classes: list[str]):
        self.folder, self.classes, self.count = Path(folder), classes, 0
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        (self.folder / "images").mkdir(parents=True, exist_ok=True)
        (self.folder / "masks").mkdir(parents=True, exist_ok=True)

    def add(self, scene: Any) -> None:
        """Write one pipelines.scenes.Scene (its image_id is set to the next number)."""
        from pipelines.coco import save_png, to_coco

        self.count += 1
        scene.image_id = self.count
        save_png(scene.image, self.folder / "images" / f"{scene.image_id:06d}.png")
        save_png(scene.semantic, self.folder / "masks" / f"{scene.image_id:06d}.png")
        coco = to_coco([scene], self.classes)
        self.images += coco["images"]
        for ann in coco["annotations"]:
            self.annotations.append({**ann, "id": len(self.annotations) + 1})

    def close(self) -> None:
        """Write instances.json."""
        from pipelines.coco import categories

        coco = {"images": self.images, "annotations": self.annotations, "categories": categories(self.classes)}
        (self.folder / "instances.json").write_text(json.dumps(coco, sort_keys=True) + "\n")

    def __enter__(self) -> "SceneWriter":
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        if kind is None:
            self.close()


def rename_classes(folder: Path, classes: list[str]) -> None:
    """Set the category names of a split folder's instances.json (known only after every mask was read)."""
    from pipelines.coco import categories

    path = Path(folder) / "instances.json"
    coco = json.loads(path.read_text())
    coco["categories"] = categories(classes)
    path.write_text(json.dumps(coco, sort_keys=True) + "\n")


def iter_scenes(folder: Path) -> Any:
    """The scenes of a split folder (COCO scene layout) one at a time, in image-id order, with their classes
    as `pipelines.scenes.Scene` objects (the streaming form of `pipelines.coco.read_split`)."""
    from pipelines.coco import decode_mask, read_png
    from pipelines.scenes import Scene

    coco = json.loads((Path(folder) / "instances.json").read_text())
    by_image: dict[int, list[dict[str, Any]]] = {image["id"]: [] for image in coco["images"]}
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann)
    for info in sorted(coco["images"], key=lambda i: i["id"]):
        anns = by_image[info["id"]]
        masks = np.stack([decode_mask(a["segmentation"]) for a in anns]) if anns \
            else np.zeros((0, info["height"], info["width"]), dtype=bool)
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float32)
        yield Scene(read_png(Path(folder) / "images" / info["file_name"]),
                    read_png(Path(folder) / "masks" / info["file_name"])[:, :, 0], masks, boxes.reshape(-1, 4),
                    np.array([a["category_id"] - 1 for a in anns], dtype=np.int64),
                    [a.get("source", "") for a in anns], info["id"])


def scene_count(folder: Path) -> int:
    """How many scenes a split folder holds (from its instances.json)."""
    return len(json.loads((Path(folder) / "instances.json").read_text())["images"])


# ---------------------------------------------------------------- lazy splits


class LazyRows:
    """A split's items read when indexed: an int gives one item, a slice/index tensor a stacked batch.

    Holds paths and an index map only, so DataLoader workers and subsets copy nothing; readers open
    their files in the process that reads (never pickled with the object).
    """

    stacks = True  # False for per-item targets: a batch is then a list

    def __init__(self, count: int, index: np.ndarray | None = None):
        self.index = np.arange(count) if index is None else np.asarray(index, dtype=np.int64)

    def read(self, i: int) -> Any:
        raise NotImplementedError

    def read_many(self, rows: np.ndarray) -> list[Any] | torch.Tensor:
        """Items `rows`, one by one (a reader that can may return them as one stacked batch)."""
        return [self.read(int(i)) for i in rows]

    def __len__(self) -> int:
        return len(self.index)

    def _rows(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            return self.index[key]
        return self.index[np.asarray(key.cpu() if isinstance(key, torch.Tensor) else key, dtype=np.int64)]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.ndim == 0):
            return self.read(int(self.index[int(key)]))
        items = self.read_many(self._rows(key))
        if not self.stacks or isinstance(items, torch.Tensor):  # per-item targets, or already one batch
            return items
        return torch.stack(items) if items else torch.zeros((0, *self.shape[1:]), dtype=torch.uint8)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def take(self, idx: Any) -> "LazyRows":
        """The same reader over items `idx` (a subset)."""
        taken = object.__new__(type(self))
        taken.__dict__.update({**self.__dict__, "index": self._rows(idx), "_cache": None})
        return taken

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}


class NpyImages(LazyRows):
    """uint8 images [N, C, H, W] over an NHWC .npy file, memory-mapped read-only in each reading process."""

    def __init__(self, path: Path, index: np.ndarray | None = None):
        self.path, self._cache = Path(path), None
        self.file_shape = array_info(self.path)[0]
        super().__init__(self.file_shape[0], index)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        _, height, width, channels = self.file_shape
        return len(self), channels, height, width

    def _array(self) -> np.ndarray:
        if self._cache is None:
            self._cache = np.load(self.path, mmap_mode="r")
        return self._cache

    def read(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._array()[i].transpose(2, 0, 1).copy())  # a writable copy, off the map

    def read_many(self, rows: np.ndarray) -> torch.Tensor:
        """The rows as one uint8 batch [N, C, H, W], channels-last in memory (as the engine feeds models),
        read once from the map: no per-item copies."""
        order = np.argsort(rows, kind="stable")  # ascending offsets: sequential reads of the file
        block = np.empty((len(rows), *self.file_shape[1:]), dtype=np.uint8)
        block[order] = self._array()[rows[order]]
        return torch.from_numpy(block).permute(0, 3, 1, 2)

    def numpy(self) -> np.ndarray:
        """The images as a read-only NCHW view of the file (nothing read until used)."""
        return self._array()[self.index].transpose(0, 3, 1, 2) if len(self.index) != self.file_shape[0] \
            else self._array().transpose(0, 3, 1, 2)


class PngRows(LazyRows):
    """uint8 [C, H, W] images (or [H, W] semantic masks when channels is 0) from per-item PNG files."""

    def __init__(self, files: list[Path], channels: int, size: int):
        self.files, self.channels, self.size, self._cache = files, channels, size, None
        super().__init__(len(files))

    @property
    def shape(self) -> tuple[int, ...]:
        if self.channels == 0:
            return len(self), self.size, self.size
        return len(self), self.channels, self.size, self.size

    def read(self, i: int) -> torch.Tensor:
        from pipelines.coco import read_png

        array = read_png(self.files[i])
        if self.channels == 0:
            return torch.from_numpy(np.ascontiguousarray(array[:, :, 0]))
        return _to_chw(array, self.channels)

    def numpy(self) -> np.ndarray:
        """A zero-copy stand-in with the split's shape and dtype (item 0 repeated): for schemas, not pixels."""
        first = self.read(int(self.index[0])).numpy() if len(self) else np.zeros(self.shape[1:], np.uint8)
        return np.broadcast_to(first, (len(self), *first.shape))


class SceneTargets(LazyRows):
    """Per-scene targets {"boxes", "labels", "masks"} decoded from the split's COCO annotations when indexed."""

    stacks = False

    def __init__(self, annotations: list[list[dict[str, Any]]], size: int):
        self.annotations, self.size, self._cache = annotations, size, None
        super().__init__(len(annotations))

    def read(self, i: int) -> dict[str, torch.Tensor]:
        from pipelines.coco import decode_mask

        anns = self.annotations[i]
        masks = np.stack([decode_mask(a["segmentation"]) for a in anns]) if anns \
            else np.zeros((0, self.size, self.size), dtype=bool)
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float32)
        return {"boxes": torch.from_numpy(boxes.reshape(-1, 4)),
                "labels": torch.tensor([a["category_id"] - 1 for a in anns], dtype=torch.int64),
                "masks": torch.from_numpy(masks.astype(np.uint8))}


def _missing(path: Path) -> ConvForgeError:
    return ConvForgeError(f"{path}: prepared data not found (run `dvc repro augment` first)")


def _read_meta(root: Path) -> dict[str, Any]:
    meta_path = Path(root) / "meta.json"
    if not meta_path.is_file():
        raise _missing(meta_path)
    meta = json.loads(meta_path.read_text())
    if "unavailable" in meta:  # augment made no such data, and said why (e.g. scenes of too many classes)
        raise ConvForgeError(f"{root}: no data here: {meta['unavailable']}")
    return meta


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConvForgeError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")


def _subset_indices(total: int, n: int, seed: int) -> torch.Tensor:
    """`n` distinct indices out of `total`, drawn with `seed`, in ascending order."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:n].sort().values


def is_lazy(data: Any) -> bool:
    """Whether a split's images are read on demand (a `LazyRows`) rather than held as one tensor."""
    return isinstance(data.images, LazyRows)


def _take(values: Any, idx: torch.Tensor) -> Any:
    """Items `idx` of a tensor (a copy) or of a lazy reader (a view)."""
    return values.take(idx) if isinstance(values, LazyRows) else values[idx]


class _ImageTensors:
    """What both datasets share: uint8 images [N, C, H, W], as a tensor or a lazy reader."""

    images: Any

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
    """Images uint8 [N, C, H, W] (tensor, or `NpyImages` for large splits), labels int64 [N], class names
    and train mean/std (in [0, 1] units)."""

    images: Any
    labels: torch.Tensor
    classes: list[str]
    mean: list[float]
    std: list[float]
    is_copy: torch.Tensor | None = None  # bool [N] on train: materialized augmented copies
    source_size: dict[str, float] | None = None  # own photos: their own size (preparation.with_source_size)

    def subset(self, n: int | None, seed: int) -> "ClassifyData":
        """A random subset of `n` items (all of them when n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        idx = _subset_indices(len(self), n, seed)
        return replace(self, images=_take(self.images, idx), labels=self.labels[idx],
                       is_copy=None if self.is_copy is None else self.is_copy[idx])


def load_classify(root: Path, split: str, in_memory_bytes: int = IN_MEMORY_BYTES) -> ClassifyData:
    """`root/{split}/` (e.g. root = data/prepared/classify): tensors when the images fit `in_memory_bytes`,
    else a lazy memory-mapped reader."""
    _check_split(split)
    folder = Path(root) / split
    meta = _read_meta(Path(root))
    if not (folder / "images.npy").is_file():
        raise _missing(folder / "images.npy")
    shape, dtype, _ = array_info(folder / "images.npy")
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize <= in_memory_bytes:
        images = torch.from_numpy(np.ascontiguousarray(np.load(folder / "images.npy").transpose(0, 3, 1, 2)))
    else:
        images = NpyImages(folder / "images.npy")
    labels = torch.from_numpy(np.load(folder / "labels.npy").astype(np.int64))
    is_copy = torch.from_numpy(np.load(folder / "is_copy.npy")) if (folder / "is_copy.npy").is_file() else None
    return ClassifyData(images, labels, list(meta["classes"]), list(meta["mean"]), list(meta["std"]), is_copy,
                        meta.get("source_size"))


@dataclass(frozen=True)
class SceneData(_ImageTensors):
    """Scene images uint8 [N, C, H, W], semantic masks uint8 [N, H, W] (0 = background, c + 1 = class c),
    per-image targets {"boxes" float32 [k, 4] xyxy, "labels" int64 [k] (0..C-1), "masks" uint8 [k, H, W]}:
    tensors and a list, or lazy readers of the PNGs and annotations for large splits."""

    images: Any
    masks: Any
    targets: Any
    classes: list[str]
    mean: list[float]
    std: list[float]
    image_ids: list[int] = field(default_factory=list)
    source_size: dict[str, float] | None = None  # own photos: their own size (preparation.with_source_size)

    def subset(self, n: int | None, seed: int) -> "SceneData":
        """A random subset of `n` scenes (all of them when n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        idx = _subset_indices(len(self), n, seed)
        keep = idx.tolist()
        targets = self.targets.take(idx) if isinstance(self.targets, LazyRows) else [self.targets[i] for i in keep]
        return replace(self, images=_take(self.images, idx), masks=_take(self.masks, idx), targets=targets,
                       image_ids=[self.image_ids[i] for i in keep] if self.image_ids else [])


def load_scenes(root: Path, split: str, in_memory_bytes: int = IN_MEMORY_BYTES) -> SceneData:
    """`root/{split}/` (e.g. root = data/prepared/scenes): PNG images, semantic masks, COCO instances;
    in memory when the split's pixels and instance masks fit `in_memory_bytes`, else read per scene."""
    _check_split(split)
    root = Path(root)
    meta = _read_meta(root)
    folder = root / split
    if not (folder / "instances.json").is_file():
        raise _missing(folder / "instances.json")
    coco = json.loads((folder / "instances.json").read_text())
    size, channels = int(meta["image_size"]), int(meta["in_channels"])
    pixels = (len(coco["images"]) * (channels + 1) + len(coco["annotations"])) * size * size
    if pixels > in_memory_bytes:
        return _lazy_scenes(folder, coco, meta)
    return _eager_scenes(folder, meta)


def _lazy_scenes(folder: Path, coco: dict[str, Any], meta: dict[str, Any]) -> SceneData:
    size, channels = int(meta["image_size"]), int(meta["in_channels"])
    infos = sorted(coco["images"], key=lambda i: i["id"])
    by_image: dict[int, list[dict[str, Any]]] = {info["id"]: [] for info in infos}
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann)
    names = [info["file_name"] for info in infos]
    return SceneData(PngRows([folder / "images" / n for n in names], channels, size),
                     PngRows([folder / "masks" / n for n in names], 0, size),
                     SceneTargets([by_image[info["id"]] for info in infos], size),
                     list(meta["classes"]), list(meta["mean"]), list(meta["std"]), [info["id"] for info in infos],
                     meta.get("source_size"))


def _eager_scenes(folder: Path, meta: dict[str, Any]) -> SceneData:
    from pipelines.coco import read_instances  # pycocotools only when scenes are used

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
                     [scene.image_id for scene in scenes], meta.get("source_size"))


def _to_chw(image: np.ndarray, channels: int) -> torch.Tensor:
    array = image if image.ndim == 3 else image[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array[:, :, :channels].transpose(2, 0, 1)))
