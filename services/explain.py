"""POST /explain: Grad-CAM heatmaps (pipelines/explain.py) of the served classify and detect models, in the
client image's own pixels.

Gradients need the PyTorch module, so explain runs it even where the task serves on ONNX Runtime
(`TaskRunner.module`). Each image runs alone, in a worker thread, one at a time per model (a lock):
a detector's heatmaps are one backward pass per returned box, and batching images would only make
each backward walk the whole batch's graph; hooks and `autograd.grad` leave the module's
parameters and the prediction apis' inference-mode forwards untouched. Classify explains the top
class (or `class_name`/`class_index`) with Grad-CAM at the trunk's last conv map; detect explains
each detection /detect would return (same `score_threshold`, `max_detections`) with the unpooled
Grad-CAM of its score at the head's last conv maps (pipelines.explain.detection_cams: pooled
weights light up every object of the image, not the box's).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.explain import class_cams, detection_cams
from pipelines.tasks import ClassifyTask, DetectTask, get_task
from services.endpoints import mark_domain
from services.errors import InputError
from services.imaging import Placement, Prepared
from services.results import classify_result, detect_result, served_detections
from services.runners import TaskRunner
from services.schemas import Explanation, Heatmap, ImageResult, Options, png_base64

EXPLAINED = (ClassifyTask.name, DetectTask.name)  # the tasks POST /explain answers for
LOW_RES = 32  # the low-resolution heatmap's longer side at most
CLASSIFY_METHOD = "grad-cam (Selvaraju et al. 2017) of the class logit at the conv trunk's output"
DETECT_METHOD = ("grad-cam of each detection's score at the detector head's last conv maps, gradients "
                 "not pooled (Zhao et al. 2023, ODAM)")
_LOCKS: dict[int, threading.Lock] = {}


def explained_task(options: dict[str, Any]) -> str:
    """The task a request asks to explain (`task`, default classify), or a 422 InputError."""
    task = options.get("task") or ClassifyTask.name
    if task not in EXPLAINED:
        raise InputError(422, f"task: {task} models cannot be explained; explain {' or '.join(EXPLAINED)}")
    return task


def chosen_class(runner: TaskRunner, options: dict[str, Any]) -> int | None:
    """The class index to explain (None: the top class), or a 422 InputError for an unknown class."""
    name, index = options.get("class_name"), options.get("class_index")
    if name is None and index is None:
        return None
    if runner.task != ClassifyTask.name:
        raise InputError(422, f"class_name/class_index apply to {ClassifyTask.name}, not {runner.task}")
    if name is not None and index is not None:
        raise InputError(422, "send class_name or class_index, not both")
    if name is not None:
        if name not in runner.classes:
            raise InputError(422, f"class_name: unknown class {name!r}; classes are {', '.join(runner.classes)}")
        return runner.classes.index(name)
    if not 0 <= int(index) < len(runner.classes):
        raise InputError(422, f"class_index: {index} is not in 0..{len(runner.classes) - 1}")
    return int(index)


def on_client(heat: torch.Tensor, placement: Placement) -> torch.Tensor:
    """A heatmap [H, W] over the model input to the client image's [height, width] pixels (bilinear;
    0 where the model input did not show the image, e.g. a centre crop's cut sides)."""
    rows, cols = heat.shape[-2:]
    xs = ((torch.arange(placement.width, dtype=torch.float32) + 0.5) * placement.scale_x + placement.offset_x)
    ys = ((torch.arange(placement.height, dtype=torch.float32) + 0.5) * placement.scale_y + placement.offset_y)
    grid = torch.stack(torch.meshgrid(2 * xs / cols - 1, 2 * ys / rows - 1, indexing="xy"), dim=-1)
    return F.grid_sample(heat[None, None].float(), grid[None], mode="bilinear", align_corners=False)[0, 0]


def heatmap(heat: torch.Tensor, placement: Placement, class_index: int, label: str, score: float,
            box: list[float] | None = None) -> Heatmap:
    """A Heatmap of `heat` [H, W] (model-input pixels, in [0, 1]): 8-bit PNG at the client's size
    plus a low-res array."""
    client = on_client(heat, placement).clamp(0, 1)
    scale = min(1.0, LOW_RES / max(client.shape))
    size = (max(1, round(client.shape[0] * scale)), max(1, round(client.shape[1] * scale)))
    small = F.adaptive_avg_pool2d(client[None, None], size)[0, 0]
    png = png_base64((client * 255).round().to(torch.uint8).numpy())
    return Heatmap(class_index=class_index, label=label, score=score, box=box, heatmap_png=png,
                   heatmap=np.round(small.numpy().astype(np.float64), 4).tolist())


def explain_classify(runner: TaskRunner, index: int, item: Prepared, options: Options,
                     class_index: int | None) -> ImageResult:
    """The top-k labels and the Grad-CAM of the chosen (default: top) class of one image."""
    inputs = torch.from_numpy(runner.normalize(item.array[None]))
    heat, chosen, logits = class_cams(runner.module, inputs, None if class_index is None else [class_index])
    probs = torch.softmax(logits, 1)[0].numpy()
    result = classify_result(index, probs, runner.classes, options, item.placement)
    explained = int(chosen[0])
    result.explanation = Explanation(method=CLASSIFY_METHOD, heatmaps=[heatmap(
        heat[0], item.placement, explained, runner.classes[explained], float(probs[explained]))])
    return result


def returned(options: Options) -> Callable[[dict[str, torch.Tensor]], list[int]]:
    """The detections /detect returns, best first (services.results.served_detections)."""
    def select(detections: dict[str, torch.Tensor]) -> list[int]:
        return served_detections(detections["boxes"].numpy(), detections["scores"].double().numpy(), options).tolist()
    return select


def explain_detect(runner: TaskRunner, index: int, item: Prepared, options: Options,
                   class_index: int | None) -> ImageResult:
    """The detections of one image as /detect returns them, each with the Grad-CAM of its score."""
    inputs = torch.from_numpy(runner.normalize(item.array[None]))
    select = returned(options)
    detections, heat = detection_cams(runner.module, inputs[0], select)
    kept = select(detections)
    output = {key: value[kept].float().numpy() if value.is_floating_point() else value[kept].numpy()
              for key, value in detections.items()}
    result = detect_result(index, output, runner.classes, options, item.placement)
    result.explanation = Explanation(method=DETECT_METHOD, heatmaps=[
        heatmap(heat[row], item.placement, det.class_index, det.label, det.score, det.box)
        for row, det in enumerate(result.detections or [])])
    return result


EXPLAINERS = {ClassifyTask: explain_classify, DetectTask: explain_detect}


def explain_image(runner: TaskRunner, index: int, item: Prepared, options: Options,
                  class_index: int | None) -> ImageResult:
    """One image's result with its explanation and, as every answer has, its training-domain check (`in_domain`,
    `reason`); one image at a time per model (a worker thread calls it)."""
    lock = _LOCKS.setdefault(id(runner), threading.Lock())
    with lock:
        result = EXPLAINERS[type(get_task(runner.task))](runner, index, item, options, class_index)
    mark_domain(result, runner.domain, item.facts)
    return result
