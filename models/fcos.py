"""FCOS (Tian et al. 2019, "FCOS: Fully Convolutional One-Stage Object Detection"): torchvision's
anchor-free single-stage detector on a registry backbone with an FPN at strides 4-16, or at the
strides and per-level size ranges `pipelines/geometry.py` derives from the training boxes.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead

from models._pyramid import (BACKBONE_SPACE, LEVEL_STRIDES, level_strides, pyramid_backbone,
                             with_input_transform)
from models._registry import FloatRange, IntRange, register


class FCOSDetector(FCOS):
    """FCOS with ConvForge's labels (class index + 1): its sigmoid classifier has no background
    channel, so labels shift down on the way in and up on the way out."""

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        if targets is not None:
            targets = [{**target, "labels": target["labels"] - 1} for target in targets]
        out = super().forward(images, targets)
        if isinstance(out, list):
            out = [{**det, "labels": det["labels"] + 1} for det in out]
        return out


@register("detect", "fcos", paper="Tian et al. 2019, arXiv:1904.01355",
          space={**BACKBONE_SPACE, "head_convs": IntRange(1, 4), "center_sampling_radius": FloatRange(1.0, 2.0)})
def fcos(num_classes: int, in_channels: int, image_size: int, backbone: str = "resnet",
         backbone_hparams: dict | None = {}, fpn_channels: int = 32, head_convs: int = 2,
         center_sampling_radius: float = 1.5, score_thresh: float = 0.05, detections_per_img: int = 20,
         strides: tuple[int, ...] = LEVEL_STRIDES, anchor_scale: float = 0.5) -> FCOSDetector:
    """FCOS with `head_convs` GroupNorm convs per head branch (the paper's 4 is slow on CPU); a low
    `score_thresh` (torchvision: 0.2) keeps the low-confidence detections mAP counts. `strides` are the
    pyramid levels, `anchor_scale` x stride each level's anchor size a (see below)."""
    body = pyramid_backbone(backbone, backbone_hparams, in_channels, image_size, fpn_channels, strides=strides)
    # One anchor per location. FCOS gives each level the boxes whose largest center-to-side distance
    # is in [4a, 8a) for anchor size a (Tian et al. 2019, Sec. 3.2; the finest level takes everything
    # below, the coarsest everything above); a = stride/2 spreads 10-35 px items over strides 4-16.
    level = level_strides(body, image_size, in_channels)
    anchors = AnchorGenerator(tuple((max(1.0, anchor_scale * s),) for s in level), ((1.0,),) * len(level))
    head = FCOSHead(fpn_channels, 1, num_classes, num_convs=head_convs)
    model = FCOSDetector(body, num_classes, anchor_generator=anchors, head=head,
                         center_sampling_radius=center_sampling_radius, score_thresh=score_thresh,
                         detections_per_img=detections_per_img, topk_candidates=100)
    return with_input_transform(model, in_channels, image_size)
