"""Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks"): where in the
input a classifier's class logit or a detector's box score comes from.

A forward hook (public torch API) keeps a layer's activations A while the gradient is on;
`torch.autograd.grad` of the explained score gives dS/dA without touching the parameters' `.grad`,
so a model that is serving predictions meanwhile is not disturbed. Training reports
(pipelines/plots.py `grad_cam`) and the service's POST /explain (services/explain.py) share it.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines.tasks import main_logits


def default_layer(model: nn.Module) -> nn.Module:
    """The layer a classifier is explained at: its conv trunk `features`, else its last Conv2d."""
    trunk = getattr(model, "features", None)
    if isinstance(trunk, nn.Module):
        return trunk
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no conv layer to explain")
    return convs[-1]


@contextmanager
def captured(*layers: nn.Module) -> Iterator[list[Tensor]]:
    """The activations `layers` output while the gradient is on (each map of a dict output, e.g. an FPN's;
    each call of a layer run once per pyramid level), in call order; forwards without gradient
    (inference_mode elsewhere) pass untouched."""
    store: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if not torch.is_grad_enabled():
            return None
        if isinstance(output, dict):
            store.extend(output.values())
            return OrderedDict((key, value.clone()) for key, value in output.items())
        store.append(output)
        return output.clone()  # later in-place ops (ReLU(inplace=True)) must not touch the kept activation

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def cam(activation: Tensor, gradient: Tensor, pooled: bool = True) -> Tensor:
    """ReLU(sum_k w_k A^k) [N, h, w] of activations [N, K, h, w]: w_k the spatial mean of dS/dA^k
    (Grad-CAM), or with `pooled=False` dS/dA^k at each place (HiResCAM, Draelos & Carin 2020)."""
    weights = gradient.mean((2, 3), keepdim=True) if pooled else gradient
    return F.relu((weights * activation).sum(1))


def to_input_size(maps: list[Tensor], size: tuple[int, int]) -> Tensor:
    """The sum of maps [N, h, w] (any sizes) upsampled bilinearly to `size`, each map scaled to peak 1."""
    total = sum(F.interpolate(m[:, None].detach().float(), size=size, mode="bilinear", align_corners=False)[:, 0]
                for m in maps)
    peak = total.flatten(1).amax(1).clamp(min=1e-8)[:, None, None]
    return total / peak


def class_cams(model: nn.Module, inputs: Tensor, classes: Tensor | None = None,
               layer: nn.Module | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Grad-CAM of a classifier on normalized `inputs` [N, C, H, W] for `classes` [N] (default: the top class):
    (heatmaps [N, H, W] in [0, 1], the classes explained, the logits [N, classes])."""
    was_training = model.training
    model.eval()
    try:
        with captured(layer or default_layer(model)) as store, torch.enable_grad():
            logits = main_logits(model(inputs.detach().requires_grad_(True)))
            chosen = logits.argmax(1) if classes is None else torch.as_tensor(classes).reshape(-1)
            (gradient,) = torch.autograd.grad(logits.gather(1, chosen[:, None]).sum(), store[0])
    finally:
        model.train(was_training)
    heat = to_input_size([cam(store[0].detach(), gradient)], tuple(inputs.shape[-2:]))
    return heat.cpu(), chosen.cpu(), logits.detach().float().cpu()


def detector_layers(model: nn.Module) -> list[nn.Module]:
    """The last feature maps a torchvision detector scores from, as Grad-CAM asks (its last conv layer):
    a dense head's class and box towers (FCOS, RetinaNet: one map per pyramid level), else the
    backbone's feature pyramid (Faster/Mask R-CNN pool their box features from it)."""
    head = getattr(model, "head", None)
    towers = [getattr(getattr(head, part, None), "conv", None) for part in ("classification_head", "regression_head")]
    if all(isinstance(tower, nn.Module) for tower in towers):
        return towers
    return [model.backbone]


def detection_cams(model: nn.Module, image: Tensor, select: Callable[[dict[str, Tensor]], list[int]],
                   layers: list[nn.Module] | None = None, pooled: bool = False) -> tuple[dict[str, Tensor], Tensor]:
    """Per selected detection of a torchvision detector on one normalized image [C, H, W], the CAM of its
    score at every map of `layers` (default `detector_layers`), summed over the maps: (the detections,
    detached, and heatmaps [k, H, W] in [0, 1]). `select(detections)` picks which. Unpooled by default: a
    box's score comes from a few places of a map that every object excites (Zhao et al. 2023, ODAM)."""
    was_training = model.training
    model.eval()
    try:
        with captured(*(layers or detector_layers(model))) as store, captured_input(model) as seen, torch.enable_grad():
            (detections,) = model([image.detach().requires_grad_(True)])
            chosen = select({key: value.detach() for key, value in detections.items()})
            heat = []
            for index in chosen:
                gradients = torch.autograd.grad(detections["scores"][index], store, retain_graph=True,
                                                allow_unused=True, materialize_grads=True)
                heat.append(cam_sum([cam(a.detach(), g, pooled) for a, g in zip(store, gradients)]))
    finally:
        model.train(was_training)
    detached = {key: value.detach().cpu() for key, value in detections.items()}
    size = tuple(image.shape[-2:])
    if not heat:
        return detached, torch.zeros((0, *size))
    return detached, on_image(torch.stack(heat), seen, size).cpu()


@contextmanager
def captured_input(model: nn.Module) -> Iterator[dict[str, Any]]:
    """What a torchvision detector's transform made of its input: the padded batch size (`padded`) and the
    image's own size inside it (`size`), so maps of the backbone line up with the image's pixels."""
    seen: dict[str, Any] = {}

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if not torch.is_grad_enabled():  # a prediction running meanwhile (inference_mode)
            return
        image_list = output[0]
        seen["padded"], seen["size"] = tuple(image_list.tensors.shape[-2:]), tuple(image_list.image_sizes[0])

    handle = model.transform.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def cam_sum(maps: list[Tensor]) -> Tensor:
    """Maps [1, h, w] of the pyramid's levels summed at the finest level's size: [h, w]."""
    size = max((tuple(m.shape[-2:]) for m in maps), key=lambda hw: hw[0] * hw[1])
    return sum(F.interpolate(m[:, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
               for m in maps)


def on_image(heat: Tensor, seen: dict[str, Any], size: tuple[int, int]) -> Tensor:
    """Heatmaps [k, h, w] over the detector's padded input to the image's `size`, each scaled to peak 1."""
    padded = F.interpolate(heat[:, None], size=seen["padded"], mode="bilinear", align_corners=False)
    height, width = seen["size"]
    inside = padded[:, :, :height, :width]
    if (height, width) != tuple(size):  # the transform resized the image (set_input_size)
        inside = F.interpolate(inside, size=size, mode="bilinear", align_corners=False)
    return inside[:, 0] / inside.flatten(1).amax(1).clamp(min=1e-8)[:, None, None]
