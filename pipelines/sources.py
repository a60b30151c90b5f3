"""One reader per `data.dataset` kind: built-in datasets and the user's own folders.

Classification sources give `ClassifySplits` (uint8 [N, H, W, C] images per split).
Own detect/segment data (`coco:PATH`, `masks:PATH`) gives scenes per split (pipelines.scenes.Scene).
Own data folders have `train/` and `test/` subfolders, or are flat; a flat folder's
every 5th item in name order (per class for ImageFolder) becomes the test split.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipelines.errors import ConvForgeError
from pipelines.params import BUILTIN_DATASETS, OWN_DATA_KINDS, DataParams
from pipelines.scenes import Scene, masks_to_boxes

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DIGITS_SPLIT_SEED = 0  # a fixed split: the raw dataset must not change with the experiment seed
DIGITS_TEST_FRACTION = 0.2
FLAT_TEST_EVERY = 5
MIN_COMPONENT_PIXELS = 4  # masks:PATH: smaller connected components are not instances
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


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


@dataclass
class SceneSplits:
    """Own detect/segment data: scenes per split, resized to data.image_size."""

    name: str
    source: str
    classes: list[str]
    train: list[Scene]
    test: list[Scene]
    in_channels: int
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


# ---- the user's own data ----------------------------------------------------------------------

class CorruptImages:
    """Unreadable images: reported by path, then skipped or fatal per data.on_corrupt."""

    def __init__(self, on_corrupt: str):
        self.on_corrupt = on_corrupt
        self.skipped: list[str] = []

    def report(self, path: Path, reason: str) -> None:
        if self.on_corrupt == "fail":
            raise ConvForgeError(f"{path}: unreadable image ({reason}); fix or remove it, "
                                 f"or set data.on_corrupt: skip")
        print(f"warning: skipping {path}: unreadable image ({reason})", file=sys.stderr)
        self.skipped.append(str(path))


def open_image(path: Path):
    """A fully decoded PIL image; decoder problems raise (callers report them as corrupt)."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(path)
        image.load()
    return image


def _load(path: Path, corrupt: CorruptImages):
    try:
        return open_image(path)
    except Exception as exc:  # PIL raises many types for broken files: all mean "unreadable"
        corrupt.report(path, f"{type(exc).__name__}: {exc}")
        return None


def _is_gray(image) -> bool:
    return image.mode in ("1", "L", "LA", "I", "I;16", "F")


def _fit_square(image, size: int):
    """Shorter side to `size`, then centre crop (ImageFolder images; keeps aspect ratio)."""
    from torchvision.transforms.v2 import functional as F

    return F.center_crop(F.resize(image, size, antialias=True), size)


def _letterbox(array: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """Longer side to `size`, padded with 0 at the bottom/right (scenes; keeps aspect and every object)."""
    from PIL import Image

    h, w = array.shape[:2]
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    squeeze = array.ndim == 3 and array.shape[-1] == 1
    image = Image.fromarray(array[:, :, 0] if squeeze else array)
    resized = np.asarray(image.resize(new, Image.NEAREST if nearest else Image.BILINEAR))
    if squeeze:
        resized = resized[:, :, None]
    out = np.zeros((size, size, *array.shape[2:]), dtype=array.dtype)
    out[:new[1], :new[0]] = resized
    return out


def _split_folders(root: Path) -> dict[str, Path] | None:
    """{"train": root/train, "test": root/test} when the data is pre-split, else None (flat)."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return {"train": root / "train", "test": root / "test"}
    return None


def _flat_split(names: list) -> dict[str, list]:
    return {"train": [n for i, n in enumerate(names) if i % FLAT_TEST_EVERY != FLAT_TEST_EVERY - 1],
            "test": [n for i, n in enumerate(names) if i % FLAT_TEST_EVERY == FLAT_TEST_EVERY - 1]}


def _require_dir(path: Path, kind: str) -> None:
    if not path.is_dir():
        raise ConvForgeError(f"data.dataset {kind}:{path}: no such folder")


def read_imagefolder(data: DataParams) -> ClassifySplits:
    """An ImageFolder tree (root/<class>/*.png, or root/{train,test}/<class>/...), resized to data.image_size.

    Channels: 1 if every readable image is grayscale, else 3 (grayscale ones converted to RGB).
    """
    from torchvision.datasets import ImageFolder

    root = data.path
    _require_dir(root, "imagefolder")
    folders = _split_folders(root)
    try:
        if folders:
            samples = {split: ImageFolder(str(path), allow_empty=True) for split, path in folders.items()}
            if samples["train"].classes != samples["test"].classes:
                raise ConvForgeError(f"{root}: train/ and test/ have different class folders "
                                     f"({samples['train'].classes} vs {samples['test'].classes})")
            classes = samples["train"].classes
            listed = {split: ds.samples for split, ds in samples.items()}
        else:
            dataset = ImageFolder(str(root))
            classes = dataset.classes
            listed = {"train": [], "test": []}
            for c in range(len(classes)):
                parts = _flat_split([s for s in dataset.samples if s[1] == c])
                listed["train"] += parts["train"]
                listed["test"] += parts["test"]
    except FileNotFoundError as exc:
        raise ConvForgeError(f"data.dataset imagefolder:{root}: {exc}") from None
    corrupt = CorruptImages(data.on_corrupt)
    limits = {"train": data.max_train, "test": data.max_test}
    loaded: dict[str, list] = {}
    for split, items in listed.items():
        loaded[split] = []
        for path, label in progress(items[:limits[split]], f"read {split} images"):
            image = _load(Path(path), corrupt)
            if image is not None:
                loaded[split].append((image, label))
    everything = [image for split in loaded.values() for image, _ in split]
    if not loaded["train"]:
        raise ConvForgeError(f"{root}: no readable training images")
    mode = "L" if all(_is_gray(image) for image in everything) else "RGB"

    def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
        images = [np.asarray(_fit_square(image.convert(mode), data.image_size)) for image, _ in loaded[split]]
        shape = (0, data.image_size, data.image_size) + (() if mode == "L" else (3,))
        return (np.stack(images) if images else np.zeros(shape, np.uint8),
                np.array([label for _, label in loaded[split]], dtype=np.int64))

    return _splits(data, "imagefolder", str(root), classes, arrays("train"), arrays("test"), corrupt.skipped)


def _scene(image: np.ndarray, instance_masks: list[np.ndarray], labels: list[int], semantic: np.ndarray,
           size: int, source: str) -> Scene:
    """A letterboxed scene; boxes recomputed tight around the resized masks, emptied instances dropped."""
    image = _letterbox(image, size, nearest=False)
    semantic = _letterbox(semantic, size, nearest=True)
    masks = [_letterbox(m.astype(np.uint8), size, nearest=True).astype(bool) for m in instance_masks]
    keep = [i for i, m in enumerate(masks) if m.sum() > 0]
    stacked = np.stack([masks[i] for i in keep]) if keep else np.zeros((0, size, size), dtype=bool)
    return Scene(image, semantic, stacked, masks_to_boxes(stacked),
                 np.array([labels[i] for i in keep], dtype=np.int64), [source] * len(keep))


def _find_annotations(folder: Path) -> Path:
    for name in ("instances.json", "annotations.json"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.json")) + sorted((folder / "annotations").glob("*.json"))
    if len(found) != 1:
        raise ConvForgeError(f"{folder}: expected one COCO instances JSON (instances.json), found "
                             f"{[p.name for p in found] or 'none'}")
    return found[0]


def read_coco(data: DataParams) -> SceneSplits:
    """COCO instances data (folder with instances.json + images/, or train/ and test/ such folders).

    Crowd annotations are left out; classes follow the category ids in ascending order.
    """
    from pycocotools.coco import COCO

    root = data.path
    _require_dir(root, "coco")
    folders = _split_folders(root) or {"": root}
    corrupt = CorruptImages(data.on_corrupt)
    apis, classes = {}, None
    for split, folder in folders.items():
        ann_path = _find_annotations(folder)
        try:
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # COCO() prints timings
                apis[split] = COCO(str(ann_path))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConvForgeError(f"{ann_path}: not a COCO instances file ({exc})") from None
        names = [c["name"] for c in sorted(apis[split].dataset.get("categories", []), key=lambda c: c["id"])]
        if classes is not None and names != classes:
            raise ConvForgeError(f"{root}: train and test COCO files have different categories")
        classes = names
    if not classes:
        raise ConvForgeError(f"{root}: the COCO file has no categories")
    scenes: dict[str, list[Scene]] = {"train": [], "test": []}
    channels: list[bool] = []
    for split, coco in apis.items():
        folder = folders[split]
        cat_index = {c["id"]: i for i, c in enumerate(sorted(coco.dataset["categories"], key=lambda c: c["id"]))}
        infos = sorted(coco.dataset.get("images", []), key=lambda i: i["file_name"])
        targets = {split: infos} if split else _flat_split(infos)
        for target, image_infos in targets.items():
            limit = data.max_train if target == "train" else data.max_test
            for info in progress(image_infos[:limit], f"read {target} images"):
                path = next((p for p in (folder / "images" / info["file_name"], folder / info["file_name"])
                             if p.is_file()), folder / "images" / info["file_name"])
                image = _load(path, corrupt)
                if image is None:
                    continue
                gray = _is_gray(image)
                channels.append(gray)
                anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=info["id"])) if not a.get("iscrowd", 0)]
                masks = [coco.annToMask(a).astype(bool) for a in anns]
                labels = [cat_index[a["category_id"]] for a in anns]
                semantic = np.zeros((info["height"], info["width"]), dtype=np.uint8)
                for i in sorted(range(len(masks)), key=lambda i: -masks[i].sum()):  # small ones on top
                    semantic[masks[i]] = labels[i] + 1
                array = np.asarray(image.convert("L" if gray else "RGB"))
                scenes[target].append(_scene(array, masks, labels, semantic, data.image_size, str(path)))
    return _finish_scenes(data, "coco", str(root), classes, scenes, channels, corrupt)


def _finish_scenes(data: DataParams, name: str, source: str, classes: list[str], scenes: dict[str, list[Scene]],
                   gray: list[bool], corrupt: CorruptImages) -> SceneSplits:
    """Make every image the majority channel count (1 if all gray, else 3) and number them."""
    if not scenes["train"]:
        raise ConvForgeError(f"{source}: no readable training images")
    in_channels = 1 if all(gray) else 3
    for split in scenes.values():
        for image_id, scene in enumerate(split, start=1):
            scene.image_id = image_id
            image = scene.image if scene.image.ndim == 3 else scene.image[:, :, None]
            scene.image = np.repeat(image, 3, axis=-1) if in_channels == 3 and image.shape[-1] == 1 else image
    return SceneSplits(name, source, classes, scenes["train"], scenes["test"], in_channels, corrupt.skipped)


def read_masks(data: DataParams) -> SceneSplits:
    """Image + mask PNG pairs: images/NAME.* with masks/NAME.png (0 = background, c + 1 = class c,
    255 = ignored, read as background). Instances are the 8-connected components of each class
    (smaller than 4 pixels: semantic only). Class names from classes.txt (one per line) if present."""
    from scipy import ndimage

    root = data.path
    _require_dir(root, "masks")
    folders = _split_folders(root) or {"": root}
    corrupt = CorruptImages(data.on_corrupt)
    names_file = root / "classes.txt"
    classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()] \
        if names_file.is_file() else None
    pairs: dict[str, list[tuple[Path, Path]]] = {"train": [], "test": []}
    for split, folder in folders.items():
        if not (folder / "images").is_dir() or not (folder / "masks").is_dir():
            raise ConvForgeError(f"{folder}: expected images/ and masks/ folders")
        images = sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        found = [(p, folder / "masks" / f"{p.stem}.png") for p in images]
        for target, items in ({"train": found} if split else _flat_split(found)).items():
            pairs[target] += items
    scenes: dict[str, list[Scene]] = {"train": [], "test": []}
    gray: list[bool] = []
    largest = 0
    for split, items in pairs.items():
        limit = data.max_train if split == "train" else data.max_test
        for image_path, mask_path in progress(items[:limit], f"read {split} images"):
            if not mask_path.is_file():
                corrupt.report(image_path, f"no mask {mask_path.name} in masks/")
                continue
            image, mask = _load(image_path, corrupt), _load(mask_path, corrupt)
            if image is None or mask is None:
                continue
            semantic = np.asarray(mask.convert("L")).copy()
            semantic[semantic == 255] = 0
            if semantic.shape != (image.height, image.width):
                corrupt.report(mask_path, f"mask size {semantic.shape[::-1]} differs from its image's "
                                          f"{(image.width, image.height)}")
                continue
            largest = max(largest, int(semantic.max()))
            instance_masks, labels = [], []
            for value in np.unique(semantic[semantic > 0]):
                components, count = ndimage.label(semantic == value, structure=np.ones((3, 3)))
                for k in range(1, count + 1):
                    component = components == k
                    if component.sum() >= MIN_COMPONENT_PIXELS:
                        instance_masks.append(component)
                        labels.append(int(value) - 1)
            gray.append(_is_gray(image))
            array = np.asarray(image.convert("L" if gray[-1] else "RGB"))
            scenes[split].append(_scene(array, instance_masks, labels, semantic, data.image_size, str(image_path)))
    if classes is None:
        classes = [f"class_{c + 1}" for c in range(max(largest, 1))]
    elif largest > len(classes):
        raise ConvForgeError(f"{names_file}: names {len(classes)} classes but a mask has value {largest}")
    return _finish_scenes(data, "masks", str(root), classes, scenes, gray, corrupt)


READERS: dict[str, Callable[[DataParams], ClassifySplits | SceneSplits]] = {
    "fashion-mnist": read_fashion_mnist,
    "mnist": read_mnist,
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "digits": read_digits,
    "imagefolder": read_imagefolder,
    "coco": read_coco,
    "masks": read_masks,
}


def read_dataset(data: DataParams) -> ClassifySplits | SceneSplits:
    """Read the dataset `data.dataset` names, with the reader of its kind."""
    reader = READERS.get(data.kind)
    if reader is None:
        raise ConvForgeError(f"data.dataset: expected one of {valid_datasets()}, got {data.dataset!r}")
    return reader(data)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """An .npz that np.load reads, with fixed zip timestamps so the same arrays give the same bytes.

    Members opened by name take the archive's compression and level, and ZipInfo's fixed
    default timestamp (1980-01-01)."""
    from numpy.lib import format as npy_format

    # Level 1 is fast: ~3x smaller than raw uint8 images at little cost.
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name in sorted(arrays):
            with archive.open(f"{name}.npy", "w", force_zip64=True) as handle:
                npy_format.write_array(handle, np.ascontiguousarray(arrays[name]), allow_pickle=False)
