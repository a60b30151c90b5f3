"""Own COCO annotations checked before pycocotools reads them: what makes one unreadable, said in a few words
that name the fix (pycocotools takes a polygon of 4 numbers for a box, and fails on other short or flat ones, a
string category id or an RLE of another size with errors that name neither the annotation nor the fix).
pipelines/sources.py names the annotation and drops it or stops, per data.on_corrupt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.errors import ConvForgeError


def _shown(value: Any) -> str:
    """A JSON value as the file has it, cut short for a one-line message."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def declared_size(info: dict, ann_path: Path) -> tuple[int, int]:
    """An image entry's height and width: its annotations are drawn at that size."""
    height, width = info.get("height"), info.get("width")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (height, width)):
        raise ConvForgeError(f"{ann_path}: image {info['file_name']} has height {_shown(height)} and width "
                             f"{_shown(width)}: each image needs both, as positive integers")
    return height, width


def _unknown_category(category: Any, cat_index: dict[Any, int]) -> str:
    """Why a category_id names no category: an id written as a string where the categories use integers (or the
    other way round) is said as such."""
    twin = str(category) if isinstance(category, int) else \
        int(category) if category.strip().lstrip("-").isdecimal() else None
    if twin in cat_index:
        kind = "an integer" if isinstance(category, int) else "a string"
        return f"category_id {_shown(category)} ({kind}) names no category; the categories use {_shown(twin)}"
    ids = [_shown(c) for c in cat_index]
    return f"category_id {_shown(category)} names no category (the ids: {', '.join(ids[:5])}{', ...' * (len(ids) > 5)})"


def _polygons_problem(polygons: list) -> str | None:
    """What keeps a polygon segmentation from being read: pycocotools takes a polygon of 4 numbers for a box and
    fails on other short or flat ones with errors that name neither the annotation nor the fix."""
    for polygon in polygons:
        if _is_number(polygon):
            return ("segmentation is a flat list of numbers: polygons are a list of lists, "
                    "[[x1, y1, x2, y2, x3, y3, ...]]")
        if not isinstance(polygon, list):
            return f"segmentation holds {_shown(polygon)}: polygons are lists of numbers, [[x1, y1, x2, y2, ...]]"
        wrong = [v for v in polygon if not _is_number(v)]
        if wrong:
            return f"a polygon holds {_shown(wrong[0])}, not a number"
        if len(polygon) < 6 or len(polygon) % 2:
            return (f"a polygon of {len(polygon)} numbers: each needs x, y pairs of at least 3 points (6 numbers, an "
                    "even count)")
    return None


def _rle_problem(rle: dict) -> str | None:
    """What keeps an RLE segmentation ({"counts", "size": [height, width]}) from being read."""
    if "counts" not in rle or "size" not in rle:
        return f"an RLE segmentation needs counts and size [height, width], it has {_shown(sorted(rle))}"
    size = rle["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        return f"an RLE's size {_shown(size)} is not [height, width]"
    if not isinstance(rle["counts"], (str, list)):
        return f"an RLE's counts {_shown(rle['counts'])} is neither a string nor a list of run lengths"
    return None


def annotation_problem(ann: dict, cat_index: dict[Any, int]) -> str | None:
    """What makes an annotation unreadable, in a few words, or None: checked before pycocotools sees it."""
    if ann["category_id"] not in cat_index:
        return _unknown_category(ann["category_id"], cat_index)
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, dict) and segmentation:
        return _rle_problem(segmentation)
    if isinstance(segmentation, list) and segmentation:
        return _polygons_problem(segmentation)
    if segmentation:
        return (f"segmentation {_shown(segmentation)} is neither polygons [[x1, y1, x2, y2, x3, y3, ...]] nor an "
                "RLE {counts, size}")
    bbox = ann.get("bbox")
    if bbox is None:
        return "neither a segmentation nor a bbox [x, y, width, height]"
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
        return f"bbox {_shown(bbox)} is not 4 numbers [x, y, width, height]"
    return None


def check_rle_size(ann: dict, height: int, width: int, where: str) -> None:
    """An RLE drawn at another size than its image's: the file describes other images (resized ones, or stored
    sideways), so fetch stops whatever data.on_corrupt rather than drop every such annotation."""
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, dict) and segmentation and segmentation["size"] != [height, width]:
        rle_height, rle_width = segmentation["size"]
        raise ConvForgeError(f"{where}'s segmentation is {rle_width}x{rle_height}, its image {width}x{height} (an "
                             "RLE's size is its image's [height, width])")
