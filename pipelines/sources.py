"""One reader per `data.dataset` kind: built-in datasets and the user's own folders.

Classification sources give `ClassifySplits` (uint8 [N, H, W, C] images per split).
Own detect/segment data (`coco:PATH`, `masks:PATH`) gives scenes per split (pipelines.scenes.Scene).
Own data folders have `train/` and `test/` subfolders (nothing else: val is drawn from train by
augment.val_fraction), or are flat; a flat folder's every 5th item in name order (per class for
ImageFolder) becomes the test split. Hidden (dot-prefixed) files and folders are skipped everywhere.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import features

from pipelines.coco_annotations import annotation_problem, check_rle_size, declared_size
from pipelines.datasets import ITEMS_DATA, ArrayWriter, SceneWriter, rename_classes, save_array
from pipelines.errors import ConvForgeError
from pipelines.params import BUILTIN_DATASETS, OWN_DATA_KINDS, DataParams
from pipelines.scenes import IGNORE, Scene, check_class_count, masks_to_boxes

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DIGITS_SPLIT_SEED = 0  # a fixed split: the raw dataset must not change with the experiment seed
DIGITS_TEST_FRACTION = 0.2
FLAT_TEST_EVERY = 5
UNLABELLED = "unlabelled"  # imagefolder + targets_csv: the one class of images lying outside any class folder
MIN_COMPONENT_PIXELS = 4  # masks:PATH: smaller connected components are not instances
RAW_SPLITS = ("train", "test")
SPLIT_NAMES = (*RAW_SPLITS, "val", "valid", "validation")  # never class names: they mark a pre-split tree
# Every own-data source lists images by these suffixes (Pillow decodes them all; AVIF where it was built with it).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                  *((".avif",) if features.check("avif") else ()))


@dataclass
class ClassifySplits:
    """A classification dataset: uint8 images [N, H, W, C] and int64 labels per split."""

    name: str
    source: str
    classes: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    skipped: list[str] = field(default_factory=list)


def valid_datasets() -> str:
    return ", ".join([*BUILTIN_DATASETS, *(f"{k}:PATH" for k in OWN_DATA_KINDS)])


def cache_dir(data: DataParams) -> Path:
    """Where torchvision downloads go."""
    return Path(data.cache_dir or "~/.cache/convforge").expanduser()


def progress(iterable, desc: str, total: int | None = None):
    """Progress on stderr for long loops (a line every few seconds when not on a terminal)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, mininterval=2, file=sys.stderr, leave=False)


def _limit(images: np.ndarray, labels: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    return (images, labels) if limit is None else (images[:limit], labels[:limit])


def _splits(data: DataParams, name: str, source: str, classes: list[str], train: tuple, test: tuple,
            skipped: list[str] | None = None) -> ClassifySplits:
    def as_nhwc(images) -> np.ndarray:
        array = np.asarray(images, dtype=np.uint8)
        return array[..., None] if array.ndim == 3 else array

    train_x, train_y = _limit(as_nhwc(train[0]), np.asarray(train[1], dtype=np.int64), data.max_train)
    test_x, test_y = _limit(as_nhwc(test[0]), np.asarray(test[1], dtype=np.int64), data.max_test)
    return ClassifySplits(name, source, list(classes), np.ascontiguousarray(train_x), train_y,
                          np.ascontiguousarray(test_x), test_y, skipped or [])


# ---- built-in datasets ------------------------------------------------------------------------

def _torchvision(cls, data: DataParams, name: str, hint: str = "") -> ClassifySplits:
    """A torchvision dataset from the cache, downloaded when data.download allows it."""
    from urllib.error import URLError

    root = cache_dir(data)
    try:
        train = cls(str(root), train=True, download=data.download)
        test = cls(str(root), train=False, download=data.download)
    except RuntimeError as exc:
        if not data.download:
            raise ConvForgeError(f"{name} is not in {root} and data.download is false{hint} "
                                 f"(set data.download: true, with internet access)") from None
        raise ConvForgeError(f"{name}: download to {root} failed ({str(exc).splitlines()[0]}){hint}") from None
    except (URLError, OSError) as exc:
        raise ConvForgeError(f"{name}: download to {root} failed ({exc}){hint}") from None
    as_numpy = (lambda d: d.numpy()) if hasattr(train.data, "numpy") else np.asarray
    source = getattr(cls, "mirrors", [getattr(cls, "url", cls.__name__)])[0]
    return _splits(data, name, f"torchvision {cls.__name__} ({source})", train.classes,
                   (as_numpy(train.data), train.targets), (as_numpy(test.data), test.targets))


# MD5s of the decompressed IDX files (upstream zalandoresearch/fashion-mnist). Debian recompresses
# the .gz files, so their MD5s differ from torchvision's `resources` list while the IDX bytes inside
# are the same: a file passes if its .gz matches torchvision's MD5 or its IDX content matches these.
FASHION_MNIST_IDX_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}


def read_fashion_mnist(data: DataParams, debian_dir: Path = DEBIAN_FASHION_MNIST,
                       idx_md5: dict[str, str] | None = None) -> ClassifySplits:
    """Fashion-MNIST from Debian's dataset-fashion-mnist files (checksums verified, parsed by torchvision's
    FashionMNIST), else torchvision's download when allowed, else a clear error naming both ways."""
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import check_integrity, extract_archive

    idx_md5 = idx_md5 or FASHION_MNIST_IDX_MD5
    if all((debian_dir / gz).is_file() for gz, _ in FashionMNIST.resources):
        with tempfile.TemporaryDirectory(prefix="convforge-fmnist-") as root:
            raw = Path(root) / "FashionMNIST" / "raw"  # the layout torchvision's class reads
            raw.mkdir(parents=True)
            for gz, gz_md5 in FashionMNIST.resources:
                idx = Path(extract_archive(str(debian_dir / gz), str(raw)))
                if not (check_integrity(str(debian_dir / gz), gz_md5) or check_integrity(str(idx), idx_md5[idx.name])):
                    raise ConvForgeError(f"{debian_dir / gz}: checksum mismatch (neither the .gz MD5 {gz_md5} "
                                         f"nor the IDX MD5 {idx_md5[idx.name]}); reinstall it: "
                                         f"sudo apt-get install --reinstall dataset-fashion-mnist")
            train = FashionMNIST(root, train=True, download=False)
            test = FashionMNIST(root, train=False, download=False)
            return _splits(data, "fashion-mnist", f"{debian_dir} (Debian dataset-fashion-mnist)",
                           FashionMNIST.classes, (train.data.numpy(), train.targets),
                           (test.data.numpy(), test.targets))
    cached = cache_dir(data) / "FashionMNIST" / "raw"
    if not data.download and not cached.is_dir():
        raise ConvForgeError(f"fashion-mnist not found in {debian_dir} nor {cached}: install it with "
                             f"`sudo apt-get install dataset-fashion-mnist`, or set data.download: true "
                             f"(needs internet)")
    return _torchvision(FashionMNIST, data, "fashion-mnist",
                        hint="; or install it offline with `sudo apt-get install dataset-fashion-mnist`")


def read_mnist(data: DataParams) -> ClassifySplits:
    from torchvision.datasets import MNIST
    return _torchvision(MNIST, data, "mnist")


def read_cifar10(data: DataParams) -> ClassifySplits:
    from torchvision.datasets import CIFAR10
    return _torchvision(CIFAR10, data, "cifar10")


def read_cifar100(data: DataParams) -> ClassifySplits:
    from torchvision.datasets import CIFAR100
    return _torchvision(CIFAR100, data, "cifar100")


def read_digits(data: DataParams) -> ClassifySplits:
    """scikit-learn's bundled 8x8 digits (0..16 scaled to 0..255), stratified 80/20 split (fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=DIGITS_TEST_FRACTION, stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED)
    return _splits(data, "digits", "sklearn.datasets.load_digits (UCI optical digits, 8x8)",
                   [str(d) for d in range(10)], (train_x, train_y), (test_x, test_y))


# ---- the user's own data: streamed to disk, one image decoded at a time -------------------------

class CorruptImages:
    """Images left out: unreadable ones and those over data.max_pixels, reported by path, then skipped or fatal
    per data.on_corrupt."""

    def __init__(self, on_corrupt: str, max_pixels: int):
        self.on_corrupt, self.max_pixels = on_corrupt, max_pixels
        self.skipped: list[str] = []
        self.no_mask: list[str] = []  # masks:PATH: what each image left out for its mask said

    def report(self, path: Path, reason: str) -> None:
        self._leave_out(path, f"unreadable image ({reason})", "fix or remove it")

    def missing_mask(self, image: Path, mask: Path, others: list[Path]) -> None:
        """An image of a masks tree without its masks/NAME.png; `others` are masks/NAME.* of another suffix,
        named so that a JPEG (lossy: its class ids blur) or a .PNG shows as the reason."""
        problem = f"no mask masks/{mask.name}"
        if others:
            misnamed = others[0].suffix.lower() == ".png"  # x.PNG: a PNG whose suffix is not the .png looked for
            problem += (f" (found masks/{others[0].name}: " +
                        (f"name it {mask.name})" if misnamed else "masks must be PNG, lossless)"))
        self.no_mask.append(problem)
        self._leave_out(image, problem, f"add masks/{mask.name}")

    def bad_annotation(self, where: str, problem: str) -> None:
        """A COCO annotation that cannot be read: dropped (its image kept) with one warning line, or fatal per
        data.on_corrupt."""
        if self.on_corrupt == "fail":
            raise ConvForgeError(f"{where}: {problem}; fix or remove it, or set data.on_corrupt: skip")
        print(f"warning: dropping {where}: {problem}", file=sys.stderr)

    def over_limit(self, path: Path, header: Header) -> bool:
        """Whether the image has more pixels than data.max_pixels (then reported, with the key to raise)."""
        pixels = header.width * header.height
        if pixels <= self.max_pixels:
            return False
        self._leave_out(path, f"{header.width}x{header.height} = {pixels:,} pixels, over data.max_pixels "
                              f"({self.max_pixels:,})", "raise data.max_pixels to read it")
        return True

    def _leave_out(self, path: Path, problem: str, remedy: str) -> None:
        if self.on_corrupt == "fail":
            raise ConvForgeError(f"{path}: {problem}; {remedy}, or set data.on_corrupt: skip")
        print(f"warning: skipping {path}: {problem}", file=sys.stderr)
        self.skipped.append(str(path))


EXIF_ORIENTATION = 0x0112  # the tag `pipelines.decode` applies: orientations 5-8 are transposed


@dataclass(frozen=True)
class Header:
    """What an image file's header says, read without decoding a pixel."""

    width: int
    height: int
    grey: bool


def read_header(path: Path, corrupt: CorruptImages) -> Header | None:
    """The file's size and whether it is greyscale (PIL reads the header only); None when unreadable or over
    data.max_pixels."""
    from PIL import Image

    from pipelines.decode import bomb_limit, is_grey

    try:
        # A header allocates no pixels: Pillow's bomb check, which would stop before the size can be named (and
        # warn on stderr), is off here, and data.max_pixels is checked on the size read.
        with bomb_limit(None), Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # decoded upright: sides swap
                width, height = height, width
            header = Header(width, height, is_grey(image))
    except Exception as exc:  # PIL raises many types for broken files: all mean "unreadable"
        corrupt.report(path, f"{type(exc).__name__}: {exc}")
        return None
    return None if corrupt.over_limit(path, header) else header


def auto_size(sides: list[int], cap: int, multiple: int) -> int:
    """data.image_size auto: the median of `sides`, capped at `cap`, rounded down to a multiple of
    `multiple` (strided backbones halve the input several times) and at least `multiple`."""
    median = int(np.median(sides)) if sides else cap
    return max(multiple, min(cap, median) // multiple * multiple)


def working_size(data: DataParams, headers: list[Header], scene: bool) -> int:
    """data.image_size, or with `auto` the size the images suggest: the median shorter side for
    classification (fit_square keeps the shorter side), the median longer side for scenes (letterbox
    fits the longer side), capped by auto_size_max / auto_canvas_max."""
    if data.image_size != "auto":
        return int(data.image_size)
    if scene:
        return auto_size([max(h.width, h.height) for h in headers], data.auto_canvas_max, 32)
    return auto_size([min(h.width, h.height) for h in headers], data.auto_size_max, 8)


def source_size(headers: list[Header]) -> dict[str, int | float]:
    """The training images' own size, upright, for the serving domain check (an upload is compared with the
    photos trained on, not with the working canvas they were fitted to): the median round(sqrt(width x height))
    and the median width / height."""
    sides = [round(math.sqrt(h.width * h.height)) for h in headers]
    return {"side": int(np.median(sides)), "aspect": round(float(np.median([h.width / h.height for h in headers])), 4)}


def decode(path: Path, in_channels: int, size: int, geometry: str, corrupt: CorruptImages) -> np.ndarray | None:
    """One image decoded (JPEGs at a reduced DCT scale when `size` allows), oriented, in `in_channels`,
    fitted to size x size by `geometry` ("square" or "letterbox"); None when unreadable."""
    from pipelines.decode import DecodeError, decode_file

    try:
        return decode_file(path, in_channels, size, geometry)
    except DecodeError as exc:
        corrupt.report(path, str(exc))
        return None


def _hidden(name: str) -> bool:
    """A dot-prefixed entry (.ipynb_checkpoints, .thumbnails, macOS ._x.png AppleDouble files, .DS_Store):
    never data, so skipped by every own-data source."""
    return name.startswith(".")


def _folders(root: Path) -> list[str]:
    """The visible sub-folder names of `root`, sorted."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not _hidden(p.name))


def _split_folders(root: Path) -> dict[str, Path] | None:
    """{"train": root/train, "test": root/test} when the data is pre-split, else None (flat).

    A folder named after a split (train, test, val, ...) makes the tree pre-split, so a split name never
    becomes a class; such a tree holds train/ and test/ only, since the val split is drawn from train."""
    names = _folders(root)
    if not set(names) & set(SPLIT_NAMES):
        return None
    others = [f"{n}/" for n in names if n not in RAW_SPLITS]
    if others:
        raise ConvForgeError(f"{root}: a pre-split tree holds only train/ and test/ (the val split is drawn from "
                             f"train/ by augment.val_fraction), found {', '.join(others)} beside them: move their "
                             f"contents into train/, or remove them (in a flat tree, rename a class folder named "
                             f"after a split)")
    missing = [f"{n}/" for n in RAW_SPLITS if n not in names]
    if missing:
        raise ConvForgeError(f"{root}: a pre-split tree needs train/ and test/, {missing[0]} is missing: add it, or "
                             f"move the contents of the split folder up into {root} (a flat tree: every "
                             f"{FLAT_TEST_EVERY}th item becomes the test split)")
    return {split: root / split for split in RAW_SPLITS}


def _flat_split(names: list) -> dict[str, list]:
    return {"train": [n for i, n in enumerate(names) if i % FLAT_TEST_EVERY != FLAT_TEST_EVERY - 1],
            "test": [n for i, n in enumerate(names) if i % FLAT_TEST_EVERY == FLAT_TEST_EVERY - 1]}


def _require_dir(path: Path, kind: str) -> None:
    if not path.is_dir():
        raise ConvForgeError(f"data.dataset {kind}:{path}: no such folder")


def _is_image(path: Path) -> bool:
    """Whether fetch reads the file as an image: by its suffix (IMAGE_SUFFIXES, the same for every source)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


@dataclass
class IgnoredFiles:
    """Files fetch leaves out unread (hidden ones aside): not images by their suffix, or outside the class
    folders; said on one warning line each, so a format Pillow is not asked about or a misplaced file shows."""

    not_images: list[Path] = field(default_factory=list)
    outside: list[Path] = field(default_factory=list)

    def warn(self, expected: Path | None = None) -> None:
        """The warning lines (`expected`, e.g. the targets CSV kept beside the class folders or the images, is not
        reported)."""
        for paths, where in ((self.not_images, "that are not images"), (self.outside, "outside the class folders")):
            paths = [p for p in paths if expected is None or p.resolve() != expected.resolve()]
            if paths:
                suffixes = sorted({p.suffix.lower() or "no suffix" for p in paths})
                shown = ", ".join(suffixes[:5]) + (", ..." if len(suffixes) > 5 else "")
                print(f"warning: ignored {len(paths)} file(s) {where} ({shown})", file=sys.stderr)


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not _hidden(p.name))


def _image_filter(root: Path, ignored: IgnoredFiles) -> Callable[[str], bool]:
    """ImageFolder's `is_valid_file`: image suffixes only, nothing hidden at any depth under `root`."""
    def valid(path: str) -> bool:
        if any(_hidden(part) for part in Path(path).relative_to(root).parts):
            return False
        if not _is_image(Path(path)):
            ignored.not_images.append(Path(path))
            return False
        return True
    return valid


def _image_samples(folder: Path, ignored: IgnoredFiles, allow_empty: bool,
                   unlabelled: bool) -> tuple[list[str], list[tuple[str, int]]]:
    """The visible class folders of `folder` and their (path, label) images, by torchvision's ImageFolder walk
    (the same order); files directly in `folder` are outside every class. With no class folder and `unlabelled`
    (regress on a targets CSV, which gives each image its values), the images directly in `folder`, as the one
    class UNLABELLED."""
    from torchvision.datasets.folder import make_dataset

    classes = _folders(folder)
    if not classes and unlabelled:
        return _unlabelled_samples(folder, ignored, allow_empty)
    if not classes:
        raise ConvForgeError(f"data.dataset imagefolder:{folder}: no class folders (expected <class>/<image>; images "
                             f"directly in it are read for regress, with data.targets_csv)")
    ignored.outside += _visible_files(folder)
    try:
        samples = make_dataset(str(folder), {c: i for i, c in enumerate(classes)},
                               is_valid_file=_image_filter(folder, ignored), allow_empty=allow_empty)
    except FileNotFoundError as exc:
        raise ConvForgeError(f"data.dataset imagefolder:{folder}: {exc}(images: {', '.join(IMAGE_SUFFIXES)})") \
            from None
    return classes, samples


def _unlabelled_samples(folder: Path, ignored: IgnoredFiles,
                        allow_empty: bool) -> tuple[list[str], list[tuple[str, int]]]:
    """The images directly in `folder` (name order), all of the class UNLABELLED."""
    valid = _image_filter(folder, ignored)
    samples = [(str(p), 0) for p in _visible_files(folder) if valid(str(p))]
    if not samples and not allow_empty:
        raise ConvForgeError(f"data.dataset imagefolder:{folder}: no images and no class folders "
                             f"(images: {', '.join(IMAGE_SUFFIXES)})")
    return [UNLABELLED], samples


def list_imagefolder(root: Path, unlabelled: bool) -> tuple[list[str], dict[str, list[tuple[str, int]]], IgnoredFiles]:
    """The class names, (path, label) items per split of an ImageFolder tree (flat or pre-split), and the files
    left out; `unlabelled`: images without class folders are read too (`_image_samples`). Nothing is decoded here."""
    _require_dir(root, "imagefolder")
    folders, ignored = _split_folders(root), IgnoredFiles()
    if folders:
        ignored.outside += _visible_files(root)
        found = {split: _image_samples(path, ignored, allow_empty=True, unlabelled=unlabelled)
                 for split, path in folders.items()}
        if found["train"][0] != found["test"][0]:
            raise ConvForgeError(f"{root}: train/ and test/ have different class folders "
                                 f"({found['train'][0]} vs {found['test'][0]})")
        return found["train"][0], {split: samples for split, (_, samples) in found.items()}, ignored
    classes, samples = _image_samples(root, ignored, allow_empty=False, unlabelled=unlabelled)
    listed: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for c in range(len(classes)):
        parts = _flat_split([s for s in samples if s[1] == c])
        listed["train"] += parts["train"]
        listed["test"] += parts["test"]
    return classes, listed, ignored


def _limits(data: DataParams) -> dict[str, int | None]:
    return {"train": data.max_train, "test": data.max_test}


def spread_limit(items: list[tuple[str, int]], limit: int | None) -> list[tuple[str, int]]:
    """At most `limit` of the (path, label) items, taken round-robin over the labels (each class's items in
    their listed order), kept in the listed order: every class keeps items while the limit allows."""
    if limit is None or len(items) <= limit:
        return items
    seen: Counter[int] = Counter()
    rank = []  # each item's place within its class
    for _, label in items:
        rank.append(seen[label])
        seen[label] += 1
    chosen = sorted(range(len(items)), key=lambda i: (rank[i], items[i][1]))[:limit]
    return [items[i] for i in sorted(chosen)]


def spread_scenes(classes_of: list[frozenset[int]], limit: int | None) -> list[int]:
    """The indices, in listed order, of at most `limit` scenes given the classes each holds: in turn the class in
    the fewest chosen scenes (the lowest class on a tie) takes its next scene in listed order, so every class keeps
    scenes while the limit allows; scenes of no class fill what is left. No limit: every index, in order."""
    if limit is None or len(classes_of) <= limit:
        return list(range(len(classes_of)))
    queues: dict[int, deque[int]] = defaultdict(deque)
    for index, classes in enumerate(classes_of):
        for c in classes:
            queues[c].append(index)
    chosen: set[int] = set()
    held: Counter[int] = Counter()
    while len(chosen) < limit:
        for queue in queues.values():
            while queue and queue[0] in chosen:
                queue.popleft()
        waiting = [c for c, queue in queues.items() if queue]
        if not waiting:
            break
        index = queues[min(waiting, key=lambda c: (held[c], c))].popleft()
        chosen.add(index)
        held.update(classes_of[index])
    rest = [i for i in range(len(classes_of)) if i not in chosen]
    return sorted(chosen | set(islice(rest, limit - len(chosen))))


def _check_classify_classes(data: DataParams, classes: list[str]) -> None:
    """Classification needs 2 classes (with one, training fails later in torchmetrics); regress on a targets CSV
    needs none, so there a note says classify cannot train on these images. (Past the scenes' class limit, augment
    composes no scenes and says so: classify still works.)"""
    if len(classes) >= 2:
        return
    folders = "no class folders" if classes == [UNLABELLED] else f"1 class folder ({classes[0]})"
    if not data.targets_csv:
        raise ConvForgeError(f"data.dataset imagefolder:{data.path}: {folders}: classify needs at least 2 classes, "
                             f"one folder of images each")
    print(f"note: {data.path}: {folders}: regress (data.targets_csv) and reconstruct train on these images; classify "
          f"needs at least 2 class folders (<class>/<image>)", file=sys.stderr)


def stream_imagefolder(data: DataParams, out: Path) -> dict:
    """An ImageFolder tree (root/<class>/*.jpg, or root/{train,test}/<class>/...) into `out/{split}/images.npy`
    (uint8 [N, S, S, C]) and `labels.npy`, one image decoded at a time; returns the raw meta's fields.

    A header pass first (no pixels decoded) gives data.image_size auto and the channels: 1 if every
    readable image is greyscale, else 3 (greyscale ones converted to RGB).
    """

    from pipelines.targets import read_targets_csv, target_row

    classes, listed, ignored = list_imagefolder(data.path, unlabelled=data.targets_csv is not None)
    _check_classify_classes(data, classes)
    ignored.warn(Path(data.targets_csv).expanduser() if data.targets_csv else None)
    names, table = read_targets_csv(Path(data.targets_csv)) if data.targets_csv else ([], {})
    corrupt = CorruptImages(data.on_corrupt, data.max_pixels)
    items = {split: [(Path(p), label, read_header(Path(p), corrupt)) for p, label in
                     progress(spread_limit(listed[split], _limits(data)[split]), f"read {split} headers")]
             for split in RAW_SPLITS}
    headers = [h for split in items.values() for _, _, h in split if h is not None]
    if not any(h is not None for _, _, h in items["train"]):
        raise ConvForgeError(f"{data.path}: no readable training images")
    size, channels = working_size(data, headers, scene=False), 1 if all(h.grey for h in headers) else 3
    counts = {}
    for split, entries in items.items():
        labels, targets = [], []
        with ArrayWriter(out / split / "images.npy", (size, size, channels)) as writer:
            for path, label, header in progress(entries, f"decode {split} images"):
                array = None if header is None else decode(path, channels, size, "square", corrupt)
                if array is not None:
                    writer.append(array)
                    labels.append(label)
                    targets += [target_row(table, path, data.path, data.targets_csv)] if names else []
        save_array(out / split / "labels.npy", np.array(labels, dtype=np.int64))
        if names:  # regress on own data: the CSV's values in the items' order
            save_array(out / split / "targets.npy", np.array(targets, dtype=np.float32).reshape(-1, len(names)))
        counts[split] = len(labels)
    if counts["train"] == 0:
        raise ConvForgeError(f"{data.path}: no readable training images")
    return {"name": "imagefolder", "source": str(data.path), "kind": ITEMS_DATA, "classes": list(classes),
            "in_channels": channels, "image_size": [size, size], "splits": counts, "skipped": corrupt.skipped,
            "source_size": source_size([h for _, _, h in items["train"] if h is not None]),
            **({"target_names": names} if names else {})}


def _scene(image: np.ndarray, instance_masks: list[np.ndarray], labels: list[int], semantic: np.ndarray,
           size: int, source: str) -> Scene:
    """A letterboxed scene; boxes recomputed tight around the resized masks, emptied instances dropped."""
    from pipelines.decode import letterbox

    semantic = letterbox(semantic, size, nearest=True)[0]
    masks = [letterbox(m.astype(np.uint8), size, nearest=True)[0].astype(bool) for m in instance_masks]
    keep = [i for i, m in enumerate(masks) if m.sum() > 0]
    stacked = np.stack([masks[i] for i in keep]) if keep else np.zeros((0, size, size), dtype=bool)
    return Scene(image, semantic, stacked, masks_to_boxes(stacked),
                 np.array([labels[i] for i in keep], dtype=np.int64), [source] * len(keep))


def _find_annotations(folder: Path) -> Path:
    for name in ("instances.json", "annotations.json"):
        if (folder / name).is_file():
            return folder / name
    found = [p for p in sorted(folder.glob("*.json")) + sorted((folder / "annotations").glob("*.json"))
             if not _hidden(p.name)]
    if len(found) != 1:
        raise ConvForgeError(f"{folder}: expected one COCO instances JSON (instances.json), found "
                             f"{[p.name for p in found] or 'none'}")
    return found[0]


COCO_ID = (int, str)  # ids are integers (some exporters write strings): they must tell entries apart
# What pycocotools assumes of each entry (it asserts, or raises KeyError where it reads them), and each key's type.
COCO_ENTRY_KEYS = {"images": {"id": COCO_ID, "file_name": str},
                   "annotations": {"id": COCO_ID, "image_id": COCO_ID, "category_id": COCO_ID},
                   "categories": {"id": COCO_ID, "name": object}}
# Keys naming one entry each: pycocotools' index keeps the last entry of an id, and an image listed twice is read twice.
COCO_UNIQUE_KEYS = (("images", "id"), ("images", "file_name"), ("annotations", "id"), ("categories", "id"))


def _check_coco(path: Path, dataset: Any) -> None:
    """A one-line error naming the file and the entry when `dataset` is not the shape pycocotools reads."""
    if not isinstance(dataset, dict):
        raise ConvForgeError(f"{path}: not a COCO instances file: its top level is a JSON {type(dataset).__name__}, "
                             f"not an object with images, annotations and categories")
    for section, keys in COCO_ENTRY_KEYS.items():
        entries = dataset.get(section, [])
        if not isinstance(entries, list):
            raise ConvForgeError(f"{path}: {section} is a JSON {type(entries).__name__}, not a list")
        for index, entry in enumerate(entries):
            named = f" (id {entry['id']})" if isinstance(entry, dict) and "id" in entry else ""
            missing = [key for key in keys if not isinstance(entry, dict) or key not in entry]
            if missing:
                raise ConvForgeError(f"{path}: {section}[{index}]{named} has no {missing[0]}")
            wrong = [key for key, kind in keys.items() if not isinstance(entry[key], kind)]
            if wrong:
                raise ConvForgeError(f"{path}: {section}[{index}]{named} has {wrong[0]} {json.dumps(entry[wrong[0]])}, "
                                     f"expected {'a string' if keys[wrong[0]] is str else 'an integer or a string'}")
    _check_coco_links(path, dataset)


def _check_coco_links(path: Path, dataset: dict) -> None:
    """One line where pycocotools would go on silently: an id or image file_name seen before (its index keeps one
    entry, an image listed twice is read twice), or an annotation whose image_id names no image (never read)."""
    for section, key in COCO_UNIQUE_KEYS:
        first: dict[Any, int] = {}
        for index, entry in enumerate(dataset.get(section, [])):
            if entry[key] in first:
                raise ConvForgeError(f"{path}: {section}[{index}] repeats the {key} {entry[key]!r} of "
                                     f"{section}[{first[entry[key]]}]: each {key} must be unique within {section}")
            first[entry[key]] = index
    images = {image["id"] for image in dataset.get("images", [])}
    for index, annotation in enumerate(dataset.get("annotations", [])):
        if annotation["image_id"] not in images:
            raise ConvForgeError(f"{path}: annotations[{index}] (id {annotation['id']}) has image_id "
                                 f"{annotation['image_id']!r}, which names no image: add the image to images, or "
                                 "remove the annotation")


def _load_coco(path: Path) -> Any:
    """pycocotools' COCO index of an instances file, its structure checked first (`_check_coco`)."""
    from pycocotools.coco import COCO

    try:
        dataset = json.loads(path.read_bytes())
    except ValueError as exc:
        raise ConvForgeError(f"{path}: not a COCO instances file ({exc})") from None
    _check_coco(path, dataset)
    coco = COCO()
    coco.dataset = dataset
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # createIndex() prints
            coco.createIndex()
    except (ValueError, KeyError, TypeError) as exc:
        raise ConvForgeError(f"{path}: not a COCO instances file ({exc!r})") from None
    return coco


def _coco_apis(root: Path) -> tuple[dict[str, Path], dict[str, tuple[Path, Any]], list[str]]:
    """Split folders, their annotation files with pycocotools COCO objects, and the class names (category ids
    ascending)."""
    folders = _split_folders(root) or {"": root}
    apis, classes = {}, None
    for split, folder in folders.items():
        ann_path = _find_annotations(folder)
        apis[split] = ann_path, _load_coco(ann_path)
        categories = sorted(apis[split][1].dataset.get("categories", []), key=lambda c: c["id"])
        _check_category_names(ann_path, categories)
        names = [c["name"] for c in categories]
        if classes is not None and names != classes:
            raise ConvForgeError(f"{root}: train and test COCO files have different categories")
        classes = names
        check_class_count(len(names), str(ann_path))
    if not classes:
        raise ConvForgeError(f"{root}: the COCO file has no categories")
    return folders, apis, classes


def _check_category_names(ann_path: Path, categories: list[dict]) -> None:
    """One line when two categories share a name: two classes under one label would be told apart nowhere (the
    service's answers, the per-class metrics and plots)."""
    first: dict[str, Any] = {}
    for category in categories:
        name = json.dumps(category["name"], sort_keys=True)
        if name in first:
            ids = f"{json.dumps(first[name])} and {json.dumps(category['id'])}"
            raise ConvForgeError(f"{ann_path}: categories id {ids} share the name {name}: give each category its own "
                                 "name, or merge them into one")
        first[name] = category["id"]


@dataclass(frozen=True)
class SceneSource:
    """One own-data scene to read: its image, its header, and how to get its instances."""

    image: Path
    header: Header | None
    instances: Callable[[], tuple[list[np.ndarray], list[int], np.ndarray] | None]  # masks, labels, semantic


def _coco_sources(data: DataParams, corrupt: CorruptImages) -> tuple[list[str], dict[str, list[SceneSource]]]:
    folders, apis, classes = _coco_apis(data.path)
    planned: dict[str, list[SceneSource]] = {"train": [], "test": []}
    for split, (ann_path, coco) in apis.items():
        folder = folders[split]
        cat_index = {c["id"]: i for i, c in enumerate(sorted(coco.dataset["categories"], key=lambda c: c["id"]))}
        visible = [i for i in coco.dataset.get("images", []) if not any(map(_hidden, Path(i["file_name"]).parts))]
        infos = sorted(visible, key=lambda i: i["file_name"])
        for target, image_infos in ({split: infos} if split else _flat_split(infos)).items():
            classes_of = lambda info: _coco_classes(coco, info, cat_index)  # noqa: E731 (read only under a limit)
            for info in _spread(image_infos, classes_of, _limits(data)[target]):
                path = next((p for p in (folder / "images" / info["file_name"], folder / info["file_name"])
                             if p.is_file()), folder / "images" / info["file_name"])
                planned[target].append(SceneSource(path, read_header(path, corrupt),
                                                   _coco_instances(coco, info, cat_index, ann_path, corrupt)))
    return classes, planned


def _spread(items: list, classes_of: Callable[[Any], frozenset[int]], limit: int | None) -> list:
    """At most `limit` scenes of `items` with every class kept in turn (`spread_scenes`); each item's classes are
    looked up only when the limit leaves items out, so no limit reads nothing more."""
    if limit is None or len(items) <= limit:
        return items
    return [items[i] for i in spread_scenes([classes_of(item) for item in items], limit)]


def _coco_classes(coco: Any, info: dict, cat_index: dict[Any, int]) -> frozenset[int]:
    """The classes an image's annotations name (crowd ones and unknown category ids aside), from the index alone."""
    return frozenset(cat_index[a["category_id"]] for a in coco.imgToAnns.get(info["id"], [])
                     if not a.get("iscrowd", 0) and a["category_id"] in cat_index)


def _annotation_mask(coco: Any, ann: dict, height: int, width: int) -> np.ndarray:
    """An annotation's mask; a box-only one (no segmentation, or an empty one, as detection-only exporters write)
    is its box filled, clipped to the image, so segmentation then learns boxes."""
    from pycocotools import mask as mask_utils

    if ann.get("segmentation"):
        return coco.annToMask(ann).astype(bool)
    box = mask_utils.frPyObjects(np.asarray([ann["bbox"]], dtype=np.float64), height, width)
    return mask_utils.decode(box)[:, :, 0].astype(bool)


def _coco_instances(coco: Any, info: dict, cat_index: dict[Any, int], ann_path: Path,
                    corrupt: CorruptImages) -> Callable:
    """The instance masks (full resolution, decoded when called), labels and semantic mask of one image; an
    annotation that cannot be read is named by its id and dropped, or stops the fetch, per data.on_corrupt."""
    def instances() -> tuple[list[np.ndarray], list[int], np.ndarray]:
        height, width = declared_size(info, ann_path)
        masks, labels = [], []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=info["id"])):
            if ann.get("iscrowd", 0):
                continue
            where = f"{ann_path}: image {info['file_name']}: annotation {ann['id']}"
            problem = annotation_problem(ann, cat_index)
            if problem is None:
                check_rle_size(ann, height, width, where)
                try:
                    masks.append(_annotation_mask(coco, ann, height, width))
                    labels.append(cat_index[ann["category_id"]])
                except (KeyError, TypeError, ValueError, IndexError) as exc:
                    problem = f"unusable segmentation ({exc!r})"
            if problem is not None:
                corrupt.bad_annotation(where, problem)
        semantic = np.zeros((height, width), dtype=np.uint8)
        for i in sorted(range(len(masks)), key=lambda i: -masks[i].sum()):  # small ones on top
            semantic[masks[i]] = labels[i] + 1
        return masks, labels, semantic
    return instances


def _stream_scenes(data: DataParams, out: Path, name: str, classes: list[str],
                   planned: dict[str, list[SceneSource]], corrupt: CorruptImages, no_instances: str) -> dict:
    """Decode, letterbox and write each planned scene in turn into `out/{split}/` (the COCO scene layout).
    When no scene holds an instance, stops with `no_instances`: detect and segment would have nothing to learn."""

    headers = [s.header for split in planned.values() for s in split if s.header is not None]
    if not any(s.header is not None for s in planned["train"]):
        raise ConvForgeError(f"{data.path}: no readable training images")
    size, channels = working_size(data, headers, scene=True), 1 if all(h.grey for h in headers) else 3
    counts, instances = {}, 0
    for split, sources in planned.items():
        with SceneWriter(out / split, classes) as writer:
            for source in progress(sources, f"decode {split} images"):
                found = source.instances() if source.header is not None else None
                if found is not None and found[2].shape != (source.header.height, source.header.width):
                    corrupt.report(source.image, f"annotations are {found[2].shape[1]}x{found[2].shape[0]}, the "
                                                 f"upright image {source.header.width}x{source.header.height}")
                    found = None
                image = None if found is None else decode(source.image, channels, size, "letterbox", corrupt)
                if image is not None:
                    scene = _scene(image, *found, size, str(source.image))
                    writer.add(scene)
                    instances += len(scene.labels)
            counts[split] = writer.count
    if counts["train"] == 0:
        raise ConvForgeError(f"{data.path}: no readable training images")
    if instances == 0:
        raise ConvForgeError(f"{data.path}: no instance in any image: {no_instances}")
    return {"name": name, "source": str(data.path), "kind": name, "classes": classes, "in_channels": channels,
            "image_size": [size, size], "splits": counts, "skipped": corrupt.skipped,
            "source_size": source_size([s.header for s in planned["train"] if s.header is not None])}


def stream_coco(data: DataParams, out: Path) -> dict:
    """COCO instances data (folder with instances.json + images/, or train/ and test/ such folders) into
    `out/{split}/` as letterboxed scenes, one image at a time; returns the raw meta's fields.

    Crowd annotations are left out, and those that cannot be read per data.on_corrupt (`annotation_problem`);
    classes follow the category ids in ascending order, each with its own name.
    """
    _require_dir(data.path, "coco")
    corrupt = CorruptImages(data.on_corrupt, data.max_pixels)
    classes, planned = _coco_sources(data, corrupt)
    return _stream_scenes(data, out, "coco", classes, planned, corrupt,
                          "every annotation is a crowd one, or empty once fitted to its image")


def _mask_values(mask: Any, mask_path: Path) -> np.ndarray:
    """A mask image's class values, uint8 [H, W]: a palette ("P", VOC style) mask's indices, not their colours'
    brightness; a 1-bit mask's 0/1 (foreground = class 1, not 255, the ignore value); any other grey mode's grey.
    A colour mask (VOC colours saved as RGB) stops the fetch: the brightness of its colours would be read as
    hundreds of classes."""
    if mask.mode in ("P", "PA", "1"):
        return np.asarray(mask.getchannel(0), dtype=np.uint8).copy()
    if len([band for band in mask.getbands() if band not in ("A", "a", "X")]) > 1:
        rgb = np.asarray(mask.convert("RGB"))
        if (rgb != rgb[..., :1]).any():
            raise ConvForgeError(f"{mask_path}: a colour ({mask.mode}) mask: write class ids as a grey (L) or palette "
                                 f"(P) PNG (0 = background, 1..K = classes, {IGNORE} = ignored)")
        return rgb[..., 0].copy()
    return np.asarray(mask.convert("L")).copy()


def _class_values(semantic: np.ndarray) -> np.ndarray:
    """The class values a mask holds: 1..254, background (0) and the ignore value aside."""
    return np.unique(semantic[(semantic > 0) & (semantic != IGNORE)])


def _read_mask(mask_path: Path, corrupt: CorruptImages | None) -> np.ndarray | None:
    """A mask's class values (`_mask_values`); None when unreadable (reported when `corrupt` is given)."""
    from pipelines.decode import DecodeError, open_image

    try:
        mask = open_image(mask_path)
    except DecodeError as exc:
        if corrupt is not None:
            corrupt.report(mask_path, str(exc))
        return None
    return _mask_values(mask, mask_path)


def _mask_classes(mask_path: Path) -> frozenset[int]:
    """The classes a mask holds, for data.max_train's choice of scenes: a missing or unreadable mask holds none
    here (it is reported if its scene is chosen)."""
    semantic = _read_mask(mask_path, None) if mask_path.is_file() else None
    return frozenset() if semantic is None else frozenset(int(v) - 1 for v in _class_values(semantic))


@dataclass
class MaskValues:
    """The largest class value in the masks read (the ignore value aside) and a mask that holds it, for the check
    against classes.txt."""

    largest: int = 0
    where: Path | None = None

    def add(self, semantic: np.ndarray, mask_path: Path) -> None:
        top = int(semantic[semantic != IGNORE].max(initial=0))
        if top > self.largest:
            self.largest, self.where = top, mask_path


def _mask_instances(mask_path: Path, header: Header, corrupt: CorruptImages, values: MaskValues) -> Callable:
    """The instances of one masks/NAME.png, read when called: 8-connected components per class value (1..254);
    the ignore value stays in the semantic mask and makes no instance."""
    def instances() -> tuple[list[np.ndarray], list[int], np.ndarray] | None:
        from scipy import ndimage

        semantic = _read_mask(mask_path, corrupt)
        if semantic is None:
            return None
        if semantic.shape != (header.height, header.width):
            corrupt.report(mask_path, f"mask size {semantic.shape[::-1]} differs from its image's "
                                      f"{(header.width, header.height)}")
            return None
        values.add(semantic, mask_path)
        masks, labels = [], []
        for value in _class_values(semantic):
            components, count = ndimage.label(semantic == value, structure=np.ones((3, 3)))
            for k in range(1, count + 1):
                if (components == k).sum() >= MIN_COMPONENT_PIXELS:
                    masks.append(components == k)
                    labels.append(int(value) - 1)
        return masks, labels, semantic
    return instances


def _mask_pairs(folder: Path, ignored: IgnoredFiles) -> list[tuple[Path, Path]]:
    """(images/NAME.*, masks/NAME.png) of one folder of a masks tree, in name order; two images of one NAME stop
    the fetch, as both would pair with the same mask."""
    if not (folder / "images").is_dir() or not (folder / "masks").is_dir():
        raise ConvForgeError(f"{folder}: expected images/ and masks/ folders")
    files = _visible_files(folder / "images")
    ignored.not_images += [p for p in files if not _is_image(p)]
    seen: dict[str, Path] = {}
    for image in filter(_is_image, files):
        if image.stem in seen:
            raise ConvForgeError(f"{folder / 'images'}: {seen[image.stem].name} and {image.name} share the name "
                                 f"{image.stem}, so both would pair with masks/{image.stem}.png: rename or remove one")
        seen[image.stem] = image
    return [(image, folder / "masks" / f"{image.stem}.png") for image in seen.values()]


def _by_stem(folder: Path) -> dict[str, list[Path]]:
    """The visible files of `folder` by name without suffix."""
    found: dict[str, list[Path]] = defaultdict(list)
    for path in _visible_files(folder):
        found[path.stem].append(path)
    return found


def stream_masks(data: DataParams, out: Path) -> dict:
    """Image + mask PNG pairs (images/NAME.* with masks/NAME.png: 0 = background, c + 1 = class c,
    255 = ignored: left out of the segment loss and metrics; palette masks by index, 1-bit masks as class 1) into
    `out/{split}/` as scenes, one pair at a time. Instances are the 8-connected components of each class (smaller
    than 4 pixels: semantic only). Class names from classes.txt (one per line) if present."""
    root = data.path
    _require_dir(root, "masks")
    corrupt = CorruptImages(data.on_corrupt, data.max_pixels)
    names_file = root / "classes.txt"
    classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()] \
        if names_file.is_file() else None
    check_class_count(len(classes or []), str(names_file))
    planned: dict[str, list[SceneSource]] = {"train": [], "test": []}
    values, ignored = MaskValues(), IgnoredFiles()
    for split, folder in (_split_folders(root) or {"": root}).items():
        found, masks = _mask_pairs(folder, ignored), _by_stem(folder / "masks")
        for target, pairs in ({split: found} if split else _flat_split(found)).items():
            for image_path, mask_path in _spread(pairs, lambda pair: _mask_classes(pair[1]), _limits(data)[target]):
                if not mask_path.is_file():
                    corrupt.missing_mask(image_path, mask_path, [p for p in masks[mask_path.stem] if p != mask_path])
                    continue
                header = read_header(image_path, corrupt)
                planned[target].append(SceneSource(image_path, header, _mask_instances(mask_path, header, corrupt,
                                                                                       values)))
    ignored.warn()
    if not planned["train"] and corrupt.no_mask:
        raise ConvForgeError(f"{root}: no training image has its mask in masks/ (images/NAME.* needs "
                             f"masks/NAME.png); the first: {corrupt.no_mask[0]}")
    # class names are only known once every mask was read: the scenes are written with placeholders
    meta = _stream_scenes(data, out, "masks", classes or [], planned, corrupt,
                          "the masks hold only background (0) and 255 (the ignore value), or specks under "
                          f"{MIN_COMPONENT_PIXELS} pixels; write each mask's pixels as 0 = background and "
                          "1..K = class ids (a binary mask: 0 and 1)")
    if classes is None:
        classes = [f"class_{c + 1}" for c in range(max(values.largest, 1))]
    elif values.largest > len(classes):
        raise ConvForgeError(f"{names_file}: names {len(classes)} classes but {values.where} has value "
                             f"{values.largest}: name class c + 1 on line c + 1")
    for split in RAW_SPLITS:
        rename_classes(out / split, classes)
    return {**meta, "classes": classes}


# Built-in datasets are small: read whole, then written. Own data is streamed into the output folder.
READERS: dict[str, Callable[[DataParams], ClassifySplits]] = {
    "fashion-mnist": read_fashion_mnist,
    "mnist": read_mnist,
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "digits": read_digits,
}
STREAMERS: dict[str, Callable[[DataParams, Path], dict]] = {
    "imagefolder": stream_imagefolder,
    "coco": stream_coco,
    "masks": stream_masks,
}


def read_dataset(data: DataParams) -> ClassifySplits:
    """Read the built-in dataset `data.dataset` names in memory (own data is streamed: `STREAMERS`)."""
    reader = READERS.get(data.kind)
    if reader is None:
        raise ConvForgeError(f"data.dataset: expected one of {valid_datasets()}, got {data.dataset!r}")
    return reader(data)
