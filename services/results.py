"""Model outputs of one image to its `ImageResult`, in the client image's own pixels.

Every task's function takes (index, output, classes, options, placement); services/endpoints.py
says which one a task uses.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from services.imaging import Placement, boxes_to_image, mask_to_image
from services.schemas import Detection, ImageResult, LabelScore, Options, convert_boxes, encode_mask


def classify_result(index: int, probs: np.ndarray, classes: list[str], options: Options,
                    placement: Placement) -> ImageResult:
    """The `options.top_k` classes by probability, highest first."""
    order = np.argsort(-probs, kind="stable")[:options.top_k]
    labels = [LabelScore(class_index=int(c), label=classes[c], score=float(probs[c])) for c in order]
    return ImageResult(index=index, width=placement.width, height=placement.height, labels=labels)


def detect_result(index: int, output: dict[str, np.ndarray], classes: list[str], options: Options,
                  placement: Placement) -> ImageResult:
    """Detections scored >= score_threshold (at most max_detections, best first), boxes mapped back;
    instance masks when the model gives them."""
    scores = np.asarray(output["scores"], dtype=np.float64)
    keep = np.flatnonzero(scores >= options.score_threshold)
    keep = keep[np.argsort(-scores[keep], kind="stable")][:options.max_detections]
    boxes = boxes_to_image(np.asarray(output["boxes"])[keep], placement)
    shown = convert_boxes(boxes, options.box_format, placement.width, placement.height)
    masks = output.get("masks")
    detections = []
    for row, i in enumerate(keep):
        class_index = int(output["labels"][i]) - 1  # torchvision label 0 is background
        label = classes[class_index] if 0 <= class_index < len(classes) else str(class_index)
        mask = None
        if masks is not None and options.mask_format != "none":
            binary = (np.asarray(masks[i]).reshape(masks.shape[-2:]) >= 0.5).astype(np.uint8)
            mask = encode_mask(mask_to_image(binary, placement), options.mask_format)
        detections.append(Detection(box=[round(float(v), 4) for v in shown[row]], class_index=class_index,
                                    label=label, score=float(scores[i]), mask=mask))
    return ImageResult(index=index, width=placement.width, height=placement.height, detections=detections)


def segment_result(index: int, label_mask: np.ndarray, classes: list[str], options: Options,
                   placement: Placement) -> ImageResult:
    """Class mask at the input's size (pixel = class + 1, 0 = background) and pixels per class."""
    mask = mask_to_image(label_mask, placement)
    counts = np.bincount(mask.reshape(-1), minlength=len(classes) + 1)
    class_pixels = {classes[c]: int(counts[c + 1]) for c in range(len(classes)) if counts[c + 1] > 0}
    result: dict[str, Any] = {"class_pixels": class_pixels}
    if options.mask_format == "png":
        result["mask"] = encode_mask(mask, "png")
    elif options.mask_format in ("rle", "polygon"):
        result["class_masks"] = {classes[c]: encode_mask(mask == c + 1, options.mask_format)
                                 for c in range(len(classes)) if counts[c + 1] > 0}
    return ImageResult(index=index, width=placement.width, height=placement.height, **result)


def foreground_fraction(result: ImageResult) -> float:
    """Share of the image's pixels in any class (for the mask-area metric)."""
    total = max(1, result.width * result.height)
    return sum((result.class_pixels or {}).values()) / total
