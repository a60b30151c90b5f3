"""How each task is served around its model, keyed by the task adapters of pipelines/tasks.py.

The one services-side place of task behaviour: the input geometry of training (classification
items resized and centre-cropped, scenes letterboxed, or at their own pixels with `serve.scale:
native` for the tasks that allow it), the model's batch output as one value
per image, the `ImageResult` (services/results.py), the Prometheus series a result feeds, and
the request options the response repeats, and the description its api shows in /docs.json.
services/service.py makes one BentoML api per task in `TASKS` from this table, at `ROUTES`
(`/<task>`, named `<task>`), so a new task needs an entry here and no new service code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np

from pipelines.tasks import TASKS, ClassifyTask, DetectTask, ReconstructTask, RegressTask, SegmentTask, get_task
from services import observability as obs
from services.errors import InputError
from services.imaging import Fit, Placement, fit_square, letterbox, native
from services.results import (classify_result, detect_result, foreground_fraction, reconstruct_result, regress_result,
                              segment_result)
from services.schemas import ImageResult, Options, PredictionResponse


@dataclass(frozen=True)
class Endpoint:
    """One task's serving: `fit` an image to the model input, split a batch's outputs per image,
    turn one image's output into its result, and `observe` that result in the metrics."""

    fit: Callable[[np.ndarray, int], tuple[np.ndarray, Placement]]
    per_image: Callable[[Any], list[Any]]
    result: Callable[[int, Any, list[str], Options, Placement], ImageResult]
    observe: Callable[[ImageResult, str, str], None]
    echoes: tuple[str, ...] = ()  # request options the response repeats
    doc: str = ""  # what the api answers: its description in /docs.json and /schema.json
    side: Literal["short", "long"] = "short"  # the side `fit` scales to its size (fit_square: short)
    scalable: bool = False  # fully convolutional / size-free models: `serve.scale: native` applies
    takes_targets: bool = False  # scores its outputs against the request's `targets` (others answer those 400)
    masks: Callable[[Any], bool] = lambda module: False  # whether a loaded model answers masks (`mask_format`)


def probabilities(logits: np.ndarray) -> list[np.ndarray]:
    """Softmax probabilities float32 [C] per image of logits [N, C]."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    return list(probs.astype(np.float32))


def label_masks(logits: np.ndarray) -> list[np.ndarray]:
    """Label masks uint8 [S, S] per image of logits [N, K, S, S] (argmax, 0 = background)."""
    return list(logits.argmax(axis=1).astype(np.uint8))


def observe_top_label(result: ImageResult, task: str, version: str) -> None:
    top = result.labels[0]
    obs.PREDICTIONS.labels(task, version, top.label).inc()
    obs.SCORES.labels(task, version).observe(top.score)


def observe_detections(result: ImageResult, task: str, version: str) -> None:
    obs.DETECTIONS.labels(task, version).observe(len(result.detections or []))
    for det in result.detections or []:
        obs.PREDICTIONS.labels(task, version, det.label).inc()
        obs.SCORES.labels(task, version).observe(det.score)


def has_mask_head(detector: Any) -> bool:
    """Whether a torchvision detector answers instance masks (Mask R-CNN; not Faster R-CNN or FCOS)."""
    heads = getattr(detector, "roi_heads", None)
    return bool(heads is not None and heads.has_mask())


def observe_mask_area(result: ImageResult, task: str, version: str) -> None:
    obs.MASK_AREA.labels(task, version).observe(foreground_fraction(result))


def restored_images(outputs: np.ndarray) -> list[np.ndarray]:
    """Restored images float32 [C, S, S] in [0, 1] per image of a batch [N, C, S, S]."""
    return list(np.clip(outputs, 0, 1).astype(np.float32))


def observe_psnr(result: ImageResult, task: str, version: str) -> None:
    if result.psnr is not None:
        obs.RECONSTRUCTION_PSNR.labels(task, version).observe(result.psnr)


def observe_values(result: ImageResult, task: str, version: str) -> None:
    for name, value in zip(result.names or [], result.values or []):
        obs.REGRESSION_VALUE.labels(task, version, name).observe(value)


ENDPOINTS: dict[type, Endpoint] = {
    ClassifyTask: Endpoint(
        fit_square, probabilities, classify_result, observe_top_label,
        doc="Top-k labels with probabilities for one or many images: each image resized as in training, "
            "`top_k` labels per image, highest probability first."),
    DetectTask: Endpoint(
        letterbox, list, detect_result, observe_detections, ("box_format", "mask_format"), side="long",
        scalable=True, masks=has_mask_head,
        doc="Boxes, labels and scores in the input's own pixels: letterboxed as in training (serve.scale "
            "native: at its own pixels up to serve.max_side), boxes mapped back in `box_format`; "
            "`score_threshold` (default: the model's, chosen on val), one label per box unless `nms` is "
            "per_class, `max_detections`, instance masks in `mask_format` (models with a mask head)."),
    SegmentTask: Endpoint(
        letterbox, label_masks, segment_result, observe_mask_area, ("mask_format",), side="long", scalable=True,
        masks=lambda module: True,
        doc="Class mask at the input's size and pixels per class: a PNG (pixel = class + 1) or per-class "
            "RLE/polygons in `mask_format`, and per-class pixel counts."),
    RegressTask: Endpoint(
        fit_square, list, regress_result, observe_values,
        doc="Predicted continuous targets per image (`values`, in the targets' units, named in `names`; the "
            "default model: the rotation angle in degrees, counter-clockwise positive), each image resized "
            "as in training."),
    ReconstructTask: Endpoint(
        letterbox, restored_images, reconstruct_result, observe_psnr, side="long", takes_targets=True,
        doc="The restored (denoised, inpainted) image at the input's size as a base64 PNG (`image`): letterboxed "
            "as in training and mapped back; with `targets` (the clean images, one per image) also its `psnr` "
            "in dB."),
}
ROUTES = {f"/{name}": name for name in TASKS}  # path -> task
TARGET_ROUTES = tuple(route for route, task in ROUTES.items() if ENDPOINTS[type(get_task(task))].takes_targets)


def endpoint(task: str) -> Endpoint:
    """How task `task` is served."""
    return ENDPOINTS[type(get_task(task))]


def input_fit(task: str, image_size: int, scale: str = "fit", max_side: int = 0) -> Fit:
    """How task `task` fits an upload to its model: training's geometry at `image_size`, or with
    `scale="native"` (tasks that are `scalable`) the upload's own pixels up to `max_side`."""
    served = endpoint(task)
    if scale == "native" and served.scalable:
        return Fit(native, max_side, "long")
    return Fit(served.fit, image_size, served.side)


def checked_result(task: str, index: int, value: Any, classes: list[str], options: Options, placement: Placement,
                   domain: Any, facts: Any) -> tuple[ImageResult, list[tuple[str, str]]]:
    """Image `index`'s result in its own pixels, marked `in_domain` (with the `reason`) by the model's
    training-domain check (services.imaging.Domain); returns it and the broken rules (kind, reason)."""
    result = endpoint(task).result(index, value, classes, options, placement)
    return result, mark_domain(result, domain, facts)


def mark_domain(result: ImageResult, domain: Any, facts: Any) -> list[tuple[str, str]]:
    """Set `result.in_domain` and its `reason` from the model's training-domain check of the image's `facts`;
    returns the broken rules (kind, reason)."""
    broken = domain.check(facts)
    result.in_domain = not broken
    result.reason = "; ".join(reason for _, reason in broken) or None
    return broken


def check_targets(route: str, task: str, options: dict[str, Any]) -> None:
    """A 400 InputError when a request to `route` (serving `task`) carries `targets` its task does not score:
    they would only cost their decoding."""
    if options.get("targets") and not endpoint(task).takes_targets:
        raise InputError(400, f"targets: only {', '.join(TARGET_ROUTES)} takes targets (clean images to score "
                              f"its outputs against); {route} does not")


def response(task: str, card: Any, options: Options, results: list[ImageResult]) -> PredictionResponse:
    """The versioned response of `task`'s model `card` (services.runners.ModelCard): its results, and the
    request options the task echoes (those that apply to the model: a box-only detector has no `mask_format`)."""
    return PredictionResponse(
        task=task, model={"task": task, "family": card.family, "name": card.name, "version": card.version},
        **{key: getattr(options, key) for key in endpoint(task).echoes}, results=results)
