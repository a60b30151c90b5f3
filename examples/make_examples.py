"""Regenerate the example images the README's curls and `python -m services.predict` use.

`python examples/make_examples.py` writes, deterministically (seeded, no network):
- shirt.png: a Fashion-MNIST test item of class "Shirt" (28 px grey), as the classifier was trained on;
- scene.png: test items composed on a 64 px canvas by pipelines/scenes.py with params.yaml's
  `scenes` settings and `seed`, as the detect/segment models were trained on;
- photo.jpg: scikit-image's `astronaut` photo resized to 256 px (an out-of-domain colour photo).
Fashion-MNIST comes from data/raw when the fetch stage wrote it, else from Debian's
dataset-fashion-mnist files (pipelines/sources.py). The committed files are the reference:
another Pillow or libjpeg may encode the same pixels to other bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.params import load_params
from pipelines.scenes import Scene, compose_scene

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHIRT = "Shirt"
SHIRT_RANK = 0  # the first "Shirt" of the test split
PHOTO_SIDE = 256
JPEG_QUALITY = 85


def fashion_mnist_test() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Fashion-MNIST's test split: uint8 [N, 28, 28, 1] images, int64 labels, class names."""
    raw = ROOT / "data" / "raw"
    meta = json.loads((raw / "meta.json").read_text()) if (raw / "meta.json").is_file() else {}
    if meta.get("name") == "fashion-mnist" and meta.get("params", {}).get("max_test") is None:
        images = np.load(raw / "test" / "images.npy")
        return images, np.load(raw / "test" / "labels.npy"), list(meta["classes"])
    from pipelines.sources import read_fashion_mnist

    data = load_params(ROOT / "params.yaml").data.model_copy(update={"dataset": "fashion-mnist", "max_test": None})
    splits = read_fashion_mnist(data)
    return splits.test_images, splits.test_labels, list(splits.classes)


def full_scene(images: np.ndarray, labels: np.ndarray) -> Scene:
    """The first scene (params.yaml's scenes settings, rng seeded with params.yaml's seed) that holds
    `max_items` items of as many different classes: three things to detect."""
    params = load_params(ROOT / "params.yaml")
    rng = np.random.default_rng(params.seed)
    sources = [f"test/{i}" for i in range(len(images))]
    while True:
        scene = compose_scene(images, labels, sources, params.scenes, rng)
        if len(set(scene.labels.tolist())) == params.scenes.max_items:
            return scene


def save_grey_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(np.ascontiguousarray(array[:, :, 0])).save(path, format="PNG", optimize=True)


def main() -> None:
    images, labels, classes = fashion_mnist_test()
    shirt = int(np.flatnonzero(labels == classes.index(SHIRT))[SHIRT_RANK])
    save_grey_png(images[shirt], HERE / "shirt.png")
    scene = full_scene(images, labels)
    save_grey_png(scene.image, HERE / "scene.png")
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((PHOTO_SIDE, PHOTO_SIDE), Image.LANCZOS)
    photo.save(HERE / "photo.jpg", format="JPEG", quality=JPEG_QUALITY, optimize=True)
    print(f"shirt.png: test item {shirt}; scene.png: {', '.join(scene.sources)} "
          f"({', '.join(classes[c] for c in scene.labels)}); photo.jpg: astronaut at {PHOTO_SIDE} px")
    for name in ("shirt.png", "scene.png", "photo.jpg"):
        print(f"  {name}: {(HERE / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
