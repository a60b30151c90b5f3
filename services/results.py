"""Model outputs of one image to its `ImageResult`, in the client image's own pixels.

Every task's function takes (index, output, classes, options, placement); services/endpoints.py
says which one a task uses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipelines.metrics import one_label_per_box
from services.imaging import Placement, boxes_to_image, mask_to_image
from services.schemas import Detection, ImageResult, LabelScore, Options, convert_boxes, encode_mask


def classify_result(index: int, probs: np.ndarray, classes: list[str], options: Options,
                    placement: Placement) -> ImageResult:
    """The `options.top_k` classes by probability, highest first."""
    order = np.argsort(-probs, kind="stable")[:options.top_k]
    labels = [LabelScore(class_index=int(c), label=classes[c], score=float(probs[c])) for c in order]
    return ImageResult(index=index, width=placement.width, height=placement.height, labels=labels)


def served_detections(boxes: np.ndarray, scores: np.ndarray, options: Options) -> np.ndarray:
    """Indices of the detections an image's answer holds, best first: scored >= score_threshold, one label
    per box unless `nms` is per_class (pipelines.metrics.one_label_per_box), at most max_detections."""
    scores = np.asarray(scores, dtype=np.float64)
    keep = np.flatnonzero(scores >= options.score_threshold)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    if options.nms == "agnostic" and len(keep) > 1:
        kept = one_label_per_box(torch.from_numpy(np.asarray(boxes)[keep]), torch.from_numpy(scores[keep]))
        keep = keep[kept.numpy()]
    return keep[:options.max_detections]


def detect_result(index: int, output: dict[str, np.ndarray], classes: list[str], options: Options,
                  placement: Placement) -> ImageResult:
    """The served detections (`served_detections`), boxes mapped back; instance masks when the model gives them."""
    scores = np.asarray(output["scores"], dtype=np.float64)
    keep = served_detections(output["boxes"], scores, options)
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


def regress_result(index: int, values: np.ndarray, names: list[str], options: Options,
                   placement: Placement) -> ImageResult:
    """The predicted targets in their units (the model de-standardizes them), with their names."""
    return ImageResult(index=index, width=placement.width, height=placement.height,
                       values=[round(float(v), 6) for v in np.asarray(values).reshape(-1)], names=list(names))


def reconstruct_result(index: int, restored: np.ndarray, classes: list[str], options: Options,
                       placement: Placement) -> ImageResult:
    """The restored image (float [C, S, S] in [0, 1] of the letterboxed input) at the input's size as a base64
    PNG, and its PSNR against the request's target image `index`, when sent."""
    from pipelines.decode import to_array
    from pipelines.reconstruction import image_psnr
    from services.errors import InputError

    image = image_to_input(restored, placement)
    result = ImageResult(index=index, width=placement.width, height=placement.height, image=image_base64(image))
    if options.targets:
        target = to_array(options.targets[index], image.shape[2])
        if target.shape != image.shape:
            raise InputError(422, f"targets[{index}] is {target.shape[1]}x{target.shape[0]}, but images[{index}] is "
                                  f"{image.shape[1]}x{image.shape[0]}: send the clean image at the same size")
        as_float = [torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None].float() / 255
                    for a in (image, target)]
        result.psnr = round(float(image_psnr(*as_float)[0]), 4)  # PSNR alone: SSIM's window needs more than a pixel
    return result


def image_to_input(restored: np.ndarray, placement: Placement) -> np.ndarray:
    """A restored letterboxed image (float [C, S, S] in [0, 1]) as uint8 [H, W, C] at the input's own size
    (the letterbox's content, resized bilinearly)."""
    from PIL import Image

    array = (np.clip(np.asarray(restored, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
    new_w = max(1, round(placement.width * placement.scale_x))
    new_h = max(1, round(placement.height * placement.scale_y))
    content = np.ascontiguousarray(array[:new_h, :new_w])
    if content.shape[:2] != (placement.height, placement.width):
        pil = Image.fromarray(content[:, :, 0] if content.shape[2] == 1 else content)
        content = np.asarray(pil.resize((placement.width, placement.height), Image.BILINEAR)).reshape(
            placement.height, placement.width, array.shape[2])
    return content


def image_base64(image: np.ndarray) -> str:
    """uint8 [H, W, C] (C = 1 or 3) as a base64 PNG."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
