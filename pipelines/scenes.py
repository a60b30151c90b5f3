"""Pure scene composition: classification items pasted onto a canvas, for detect and segment.

An item's mask is its foreground: pixels that differ from the item's own background
(the median of its border) by more than `scenes.foreground_threshold`. Later items
occlude earlier ones, so instance masks are disjoint and each box is tight around the
instance's VISIBLE pixels. A position is accepted only if the new item's box has IoU
<= `max_overlap` with every earlier box and leaves every earlier instance at least
`min_visible` of its pixels; an item that finds no such position in a few tries is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from pipelines.errors import ConvForgeError
from pipelines.params import SceneParams

PLACEMENT_TRIES = 20
MIN_PIXELS = 4  # an instance needs at least this many visible pixels
IGNORE = 255  # a semantic mask's pixels of no class (VOC's void boundaries): left out of the segment loss and metrics
MAX_CLASSES = 254  # semantic masks are uint8 (PNG): 0 = background, class c is c + 1 <= 254, 255 = IGNORE


@dataclass
class Scene:
    """One canvas: image uint8 [H, W, C], semantic uint8 [H, W] (0 = background, c + 1 = class c),
    instance_masks bool [k, H, W] (disjoint), boxes float32 [k, 4] xyxy pixel edges, labels int64 [k]."""

    image: np.ndarray
    semantic: np.ndarray
    instance_masks: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    sources: list[str]  # where each instance came from, e.g. "train/123" (raw split / item index)
    image_id: int = 0


def too_many_classes(count: int) -> str | None:
    """Why `count` classes cannot be scenes, or None: class c is c + 1 in uint8 semantic masks, so a class past
    MAX_CLASSES would be ignored (IGNORE) or wrap around to another class or to background."""
    if count <= MAX_CLASSES:
        return None
    return (f"{count} classes; scenes (detect, segment) hold at most {MAX_CLASSES}, as 1..{MAX_CLASSES} in 8-bit "
            f"masks (0 = background, {IGNORE} = ignored): merge or leave out classes")


def check_class_count(count: int, where: str) -> None:
    """Stop with a one-line error when `count` classes cannot be scenes (too_many_classes)."""
    reason = too_many_classes(count)
    if reason:
        raise ConvForgeError(f"{where}: {reason}")


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes in pixel-edge coordinates (x2 = last column + 1) of non-empty masks [k, H, W]."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of `boxes` [n, 4]."""
    if len(boxes) == 0:
        return np.zeros(0)
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def item_foreground(item: np.ndarray, threshold: int) -> np.ndarray:
    """Bool [h, w]: pixels of `item` [h, w, C] that differ from its border's median colour by > threshold."""
    border = np.concatenate([item[0], item[-1], item[:, 0], item[:, -1]])
    background = np.median(border, axis=0)
    return (np.abs(item.astype(np.int16) - background).max(axis=-1) > threshold)


def _resized(item: np.ndarray, scale: float, limit: int) -> np.ndarray:
    h, w = item.shape[:2]
    size = [max(1, min(limit, round(h * scale))), max(1, min(limit, round(w * scale)))]
    if size == [h, w]:
        return item
    tensor = torch.from_numpy(np.ascontiguousarray(item.transpose(2, 0, 1)))
    return F.resize(tensor, size, antialias=True).numpy().transpose(1, 2, 0)


def compose_scene(items: np.ndarray, labels: np.ndarray, sources: list[str], params: SceneParams,
                  rng: np.random.Generator) -> Scene:
    """One scene of 1..max_items items drawn from `items` [N, h, w, C] (uint8) with `rng`."""
    size, channels = params.canvas_size, items.shape[-1]
    image = np.zeros((size, size, channels), dtype=np.uint8)
    owner = np.full((size, size), -1, dtype=np.int32)  # which placed item shows at each pixel
    placed_boxes: list[np.ndarray] = []
    placed_area: list[int] = []
    placed_index: list[int] = []
    for _ in range(int(rng.integers(params.min_items, params.max_items + 1))):
        index = int(rng.integers(len(items)))
        item = _resized(items[index], float(rng.uniform(*params.scale_range)), size)
        fg = item_foreground(item, params.foreground_threshold)
        if fg.sum() < MIN_PIXELS:
            continue
        (fy0, fx0), (fy1, fx1) = np.argwhere(fg).min(0), np.argwhere(fg).max(0) + 1
        h, w = fg.shape
        for _try in range(PLACEMENT_TRIES):
            y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            box = np.array([x + fx0, y + fy0, x + fx1, y + fy1], dtype=np.float64)
            if placed_boxes and box_iou(box, np.array(placed_boxes)).max() > params.max_overlap:
                continue
            covered = owner[y:y + h, x:x + w][fg]
            lost = np.bincount(covered[covered >= 0], minlength=len(placed_area))
            visible = np.bincount(owner[owner >= 0], minlength=len(placed_area)) - lost
            if any(v < max(MIN_PIXELS, params.min_visible * a) for v, a in zip(visible, placed_area)):
                continue
            image[y:y + h, x:x + w][fg] = item[fg]
            owner[y:y + h, x:x + w][fg] = len(placed_area)
            placed_boxes.append(box)
            placed_area.append(int(fg.sum()))
            placed_index.append(index)
            break
    instance_masks = np.stack([owner == i for i in range(len(placed_index))]) if placed_index \
        else np.zeros((0, size, size), dtype=bool)
    item_labels = labels[placed_index].astype(np.int64) if placed_index else np.zeros(0, dtype=np.int64)
    check_class_count(int(item_labels.max(initial=-1)) + 1, "compose_scene: item labels")
    semantic = np.zeros((size, size), dtype=np.uint8)
    for mask, label in zip(instance_masks, item_labels):
        semantic[mask] = label + 1
    return Scene(image, semantic, instance_masks, masks_to_boxes(instance_masks), item_labels,
                 [sources[i] for i in placed_index])


def compose_scenes(items: np.ndarray, labels: np.ndarray, sources: list[str], count: int,
                   params: SceneParams, rng: np.random.Generator, progress: str | None = None) -> list[Scene]:
    """`count` scenes from one split's items; image ids 1..count."""
    from tqdm import tqdm

    if len(items) == 0:
        return []
    check_class_count(int(np.max(labels)) + 1, "scenes composed from classification items")
    scenes = []
    for image_id in tqdm(range(1, count + 1), desc=progress, disable=progress is None, mininterval=2,
                         leave=False):
        scene = compose_scene(items, labels, sources, params, rng)
        scene.image_id = image_id
        scenes.append(scene)
    return scenes
