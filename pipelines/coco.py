"""COCO instances JSON for scene splits: writing and reading, masks as RLE via pycocotools.

A split folder holds `images/000001.png`, `masks/000001.png` (semantic, 0 = background,
c + 1 = class c) and `instances.json` (`bbox` xywh, `segmentation` RLE with `counts` as
str, `area`, `iscrowd` 0, `category_id` = c + 1, categories 1..C).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipelines.scenes import Scene


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a bool [H, W] mask, `counts` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: dict[str, Any]) -> np.ndarray:
    """Bool [H, W] from a COCO RLE (counts as str or bytes)."""
    counts = rle["counts"]
    return mask_utils.decode({"size": rle["size"], "counts": counts.encode() if isinstance(counts, str) else counts})\
        .astype(bool)


def categories(classes: list[str]) -> list[dict[str, Any]]:
    return [{"id": c + 1, "name": name, "supercategory": "object"} for c, name in enumerate(classes)]


def to_coco(scenes: list[Scene], classes: list[str]) -> dict[str, Any]:
    """The COCO instances dict of `scenes` (file names NNNNNN.png by image id)."""
    images, annotations = [], []
    for scene in scenes:
        height, width = scene.semantic.shape
        images.append({"id": scene.image_id, "file_name": f"{scene.image_id:06d}.png",
                       "height": height, "width": width})
        for mask, box, label, source in zip(scene.instance_masks, scene.boxes, scene.labels, scene.sources):
            x1, y1, x2, y2 = (int(v) for v in box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": scene.image_id, "category_id": int(label) + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": int(mask.sum()), "iscrowd": 0,
                "segmentation": encode_mask(mask), "source": source,
            })
    return {"images": images, "annotations": annotations, "categories": categories(classes)}


def save_png(array: np.ndarray, path: Path) -> None:
    """Write uint8 [H, W] or [H, W, C] (C = 1 or 3) as PNG; same pixels give the same bytes."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[:, :, 0]
    Image.fromarray(array).save(path, format="PNG")


def write_split(folder: Path, scenes: list[Scene], classes: list[str]) -> None:
    """Write `scenes` as images/, masks/ and instances.json under `folder`."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        save_png(scene.image, folder / "images" / f"{scene.image_id:06d}.png")
        save_png(scene.semantic, folder / "masks" / f"{scene.image_id:06d}.png")
    (folder / "instances.json").write_text(json.dumps(to_coco(scenes, classes), sort_keys=True) + "\n")


def read_png(path: Path) -> np.ndarray:
    """uint8 [H, W, C] (C = 1 for grayscale) from a PNG written by `save_png`."""
    with Image.open(path) as image:
        array = np.array(image)  # writable: torch.from_numpy needs it
    return array[:, :, None] if array.ndim == 2 else array


def read_split(folder: Path) -> tuple[list[Scene], list[str]]:
    """The scenes of a split folder and the class names, as written by `write_split`."""
    folder = Path(folder)
    data = json.loads((folder / "instances.json").read_text())
    classes = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    by_image: dict[int, list[dict[str, Any]]] = {image["id"]: [] for image in data["images"]}
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    scenes = []
    for info in sorted(data["images"], key=lambda i: i["id"]):
        anns = by_image[info["id"]]
        height, width = info["height"], info["width"]
        masks = np.stack([decode_mask(a["segmentation"]) for a in anns]) if anns \
            else np.zeros((0, height, width), dtype=bool)
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                         dtype=np.float32).reshape(-1, 4)
        scenes.append(Scene(
            image=read_png(folder / "images" / info["file_name"]),
            semantic=read_png(folder / "masks" / info["file_name"])[:, :, 0],
            instance_masks=masks, boxes=boxes,
            labels=np.array([a["category_id"] - 1 for a in anns], dtype=np.int64),
            sources=[a.get("source", "") for a in anns], image_id=info["id"]))
    return scenes, classes


def read_instances(folder: Path) -> list[Scene]:
    """The scenes of a split folder (see `read_split`)."""
    return read_split(folder)[0]
