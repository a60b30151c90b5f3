"""ONNX export of the models of tasks whose adapter `exports_onnx`, checked against PyTorch on ONNX Runtime.

Classifiers and segmenters export with a dynamic batch axis and are checked on their logits.
Detectors (FCOS, Faster R-CNN, Mask R-CNN: torchvision's models, pre- and post-processing
included) export for one image at the model's `image_size` (`onnx_per_image`: torchvision's
post-processing loops over the images in Python, which tracing unrolls, and each image keeps
its own number of detections); the service runs each image of a batch on its own, and the
check compares matched detections (boxes, scores, labels, masks) on scene-like images. A
graph's input size is fixed, so `serve.scale: native` serves from PyTorch
(services/backends.py). The export uses the TorchScript-based exporter (`dynamo=False`): the
dynamo exporter needs onnxscript, which the pinned stack does not ship.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipelines.errors import ConvForgeError
from pipelines.tasks import TASKS, get_task

EXPORTABLE = tuple(name for name, task in TASKS.items() if task.exports_onnx)
OPSET = 17
LOGITS = "logits"  # the one output of a batch graph
SCORE_TOL = 1e-3  # detections: |score difference| of a matched pair, and the margin around a side's cut-off
BOX_TOL = 1e-3  # detections: |coordinate difference| of a matched pair, as a fraction of the image size
MASK_TOL = 1e-2  # detections: |mask probability difference| of a matched pair


def _input_shape(config: dict[str, Any], batch: int) -> tuple[int, int, int, int]:
    size = config["image_size"]
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    return batch, int(config["in_channels"]), size, size


class TaskGraph(nn.Module):
    """What is exported: the task adapter's forward on a normalized batch; for a per-image task,
    its one image's output dict as a tuple in `names` order."""

    def __init__(self, module: nn.Module, task: str, names: tuple[str, ...] = (LOGITS,)) -> None:
        super().__init__()
        self.module, self.adapter, self.names = module.eval(), get_task(task), names
        self.eval()  # the exporter restores this wrapper's mode afterwards, and with it the module's

    def forward(self, images: Tensor) -> Any:
        out = self.adapter.forward(self.module, images)
        return tuple(out[0][name] for name in self.names) if self.adapter.onnx_per_image else out


def task_graph(module: nn.Module, config: dict[str, Any]) -> TaskGraph:
    """`module` as its task's exported graph (output names from one eager forward of a per-image task)."""
    task = str(config["task"])
    if not get_task(task).onnx_per_image:
        return TaskGraph(module, task)
    with torch.inference_mode():
        (first,) = get_task(task).forward(module.eval(), torch.zeros(_input_shape(config, 1)))
    return TaskGraph(module, task, tuple(first))


def export_onnx(module: nn.Module, config: dict[str, Any], path: Path) -> Path:
    """Write `module` (eval mode) as ONNX, atomically: a dynamic batch axis, or one image for a
    per-image task (its outputs' first axis counts detections); returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = task_graph(module, config)
    per_image = graph.adapter.onnx_per_image
    example = torch.zeros(_input_shape(config, 1 if per_image else 2))
    axis = "detections" if per_image else "batch"
    dynamic = {name: {0: axis} for name in graph.names} | ({} if per_image else {"input": {0: "batch"}})
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx.tmp", delete=False) as handle:
        staging = Path(handle.name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape math
            torch.onnx.export(graph, (example,), str(staging), input_names=["input"], output_names=list(graph.names),
                              dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def parity(module: nn.Module, config: dict[str, Any], path: Path, batch: int = 4, seed: int = 0) -> float:
    """Largest |torch - onnxruntime| logit difference on a seeded random normalized batch."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(_input_shape(config, batch), generator=generator)
    with torch.inference_mode():
        expected = module.eval()(inputs).float().numpy()
    (got,) = _session(path).run([LOGITS], {"input": inputs.numpy()})
    return float(np.abs(got - expected).max())


def scene_like(config: dict[str, Any], count: int, seed: int = 0) -> np.ndarray:
    """`count` normalized float32 [1, C, S, S] images like the training scenes: a few bright
    rectangles and ellipses of 15-50 % of the side on a dark canvas (seeded)."""
    rng = np.random.default_rng(seed)
    _, channels, size, _ = _input_shape(config, 1)
    mean = np.asarray(config.get("mean", [0.0] * channels), np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(config.get("std", [1.0] * channels), np.float32).reshape(1, -1, 1, 1)
    yy, xx = np.mgrid[:size, :size]
    images = []
    for _ in range(count):
        canvas = rng.integers(0, 30, (1, channels, size, size)).astype(np.float32)
        for _ in range(int(rng.integers(1, 4))):
            h, w = rng.integers(max(2, size * 15 // 100), max(3, size // 2), 2)
            y, x = rng.integers(0, size - h), rng.integers(0, size - w)
            inside = (yy >= y) & (yy < y + h) & (xx >= x) & (xx < x + w)
            if rng.random() < 0.5:  # the ellipse inscribed in the box
                inside &= ((yy - y - h / 2) / (h / 2)) ** 2 + ((xx - x - w / 2) / (w / 2)) ** 2 <= 1
            canvas[:, :, inside] = rng.integers(120, 256, channels).reshape(1, -1, 1)
        images.append(((canvas / 255.0 - mean) / std).astype(np.float32))
    return np.stack(images)


def _cut_off(module: nn.Module, scores: np.ndarray) -> float:
    """The lowest score a detector could have dropped: its lowest kept one when it kept its maximum
    number of detections, else its score threshold (torchvision keeps both on the model or its RoI heads)."""
    heads = getattr(module, "roi_heads", module)
    full = len(scores) >= int(heads.detections_per_img)
    return float(scores.min()) if full and len(scores) else float(heads.score_thresh)


def _unmatched(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], floor: float,
               box_tol: float) -> tuple[int, float, float, float]:
    """Detections of `ours` scored over `floor` with no same-label twin in `theirs` (box and score within
    tolerance), and the largest box, score and mask differences of the matched pairs."""
    free = np.ones(len(theirs["scores"]), bool)
    missing, worst = 0, [0.0, 0.0, 0.0]
    for i in np.argsort(-ours["scores"], kind="stable"):
        if ours["scores"][i] <= floor:
            continue
        box_diff = np.abs(theirs["boxes"] - ours["boxes"][i]).max(axis=1, initial=0.0)
        score_diff = np.abs(theirs["scores"] - ours["scores"][i])
        twins = np.flatnonzero(free & (theirs["labels"] == ours["labels"][i]) & (box_diff <= box_tol)
                               & (score_diff <= SCORE_TOL))
        if not len(twins):
            missing += 1
            continue
        j = twins[np.argmin(box_diff[twins])]
        free[j] = False
        mask_diff = float(np.abs(theirs["masks"][j] - ours["masks"][i]).max()) if "masks" in ours else 0.0
        worst = [max(worst[0], float(box_diff[j])), max(worst[1], float(score_diff[j])), max(worst[2], mask_diff)]
    return missing, *worst


def detection_parity(module: nn.Module, config: dict[str, Any], path: Path, count: int = 4,
                     seed: int = 0) -> dict[str, Any]:
    """Torch vs ONNX Runtime detections on `count` scene-like images, matched both ways. A detection
    scored over the other side's cut-off (plus SCORE_TOL) must have a twin there: ties at the score
    threshold, the detection limit or NMS may differ, nothing else."""
    session, graph = _session(path), task_graph(module, config)
    names = [output.name for output in session.get_outputs()]
    report = {"images": count, "detections": 0, "missing": 0, "max_box_diff": 0.0, "max_score_diff": 0.0,
              "max_mask_diff": 0.0}
    box_tol = BOX_TOL * _input_shape(config, 1)[-1]
    for image in scene_like(config, count, seed):
        with torch.inference_mode():
            expected = {k: v.numpy() for k, v in zip(graph.names, graph(torch.from_numpy(image)))}
        got = dict(zip(names, session.run(names, {"input": image})))
        for ours, theirs in ((expected, got), (got, expected)):
            missing, *worst = _unmatched(ours, theirs, _cut_off(module, theirs["scores"]) + SCORE_TOL, box_tol)
            report["missing"] += missing
            for key, value in zip(("max_box_diff", "max_score_diff", "max_mask_diff"), worst):
                report[key] = max(report[key], value)
        report["detections"] += len(expected["scores"])
    return report


def export_checked(module: nn.Module, config: dict[str, Any], path: Path, rtol: float = 1e-3) -> dict[str, Any]:
    """Export and check parity; a mismatch (logits over rtol x max|logit|, or a detection without its
    twin) removes the file and is an error."""
    export_onnx(module, config, path)
    if get_task(str(config["task"])).onnx_per_image:
        report = detection_parity(module, config, path)
        if report["missing"]:
            Path(path).unlink(missing_ok=True)
            raise ConvForgeError(f"{config.get('task')} {config.get('family')}: ONNX Runtime lacks {report['missing']} "
                                 f"of PyTorch's detections on scene-like images (or adds them); serve it with "
                                 "serve.backend: torch")
        return {"path": Path(path).name, "opset": OPSET, "batch": 1, "max_abs_diff": report["max_box_diff"],
                "tolerance": BOX_TOL * _input_shape(config, 1)[-1], **report}
    diff = parity(module, config, path)
    with torch.inference_mode():
        scale = float(module(torch.zeros(_input_shape(config, 1))).abs().max())
    tolerance = rtol * max(1.0, scale)
    if not diff <= tolerance:
        Path(path).unlink(missing_ok=True)
        raise ConvForgeError(f"{config.get('task')} {config.get('family')}: ONNX Runtime differs from PyTorch by "
                             f"{diff:.3g} (tolerance {tolerance:.3g}); serve it with serve.backend: torch")
    return {"path": Path(path).name, "opset": OPSET, "max_abs_diff": diff, "tolerance": tolerance}
