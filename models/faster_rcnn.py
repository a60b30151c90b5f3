"""Faster R-CNN (Ren et al. 2015, "Faster R-CNN: Towards Real-Time Object Detection with Region
Proposal Networks"): torchvision's two-stage detector on a registry backbone with an FPN, anchors
and proposal counts sized for a few small items per image; the pyramid strides, anchor scales and
aspect ratios are hparams that `pipelines/geometry.py` derives from the training boxes.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

from models._pyramid import (BACKBONE_SPACE, LEVEL_STRIDES, level_strides, pyramid_backbone,
                             with_input_transform)
from models._registry import Choice, register
from models._roi_align import SeparableRoIAlign

SPACE = {**BACKBONE_SPACE, "representation": Choice([64, 128, 256]), "proposals": Choice([50, 100, 200])}
# Two anchor sizes per level (2 and 3 x stride) x three aspect ratios (h / w): 8-48 px boxes at strides 4-16.
ANCHOR_SCALES = (2.0, 3.0)
ASPECT_RATIOS = (0.5, 1.0, 2.0)


def two_stage_parts(num_classes: int, in_channels: int, image_size: int, backbone: str, backbone_hparams: dict | None,
                    fpn_channels: int, representation: int, proposals: int, detections_per_img: int,
                    geometry: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The FPN backbone and the FasterRCNN keyword arguments Mask R-CNN shares; `geometry` holds the
    `strides`, `anchor_scales` and `aspect_ratios` hparams (today's defaults when absent)."""
    geometry = geometry or {}
    body = pyramid_backbone(backbone, backbone_hparams, in_channels, image_size, fpn_channels, extra_pool=True,
                            strides=geometry.get("strides", LEVEL_STRIDES))
    strides = level_strides(body, image_size, in_channels)
    # The same anchor scales at every level: torchvision's RPN head shares one conv across levels, so every
    # level needs as many anchors (Ren et al. 2015, Sec. 3.1.1; Lin et al. 2017, Sec. 4.1).
    scales, ratios = geometry.get("anchor_scales", ANCHOR_SCALES), geometry.get("aspect_ratios", ASPECT_RATIOS)
    anchors = AnchorGenerator(tuple(tuple(float(k) * s for k in scales) for s in strides),
                              (tuple(float(r) for r in ratios),) * len(strides))
    names = [str(i) for i in range(len(strides) - 1)]  # RoIs pool from the FPN maps, not the extra one
    box_pool = SeparableRoIAlign(names, output_size=7, sampling_ratio=2)
    kwargs = dict(
        rpn_anchor_generator=anchors, box_roi_pool=box_pool,
        box_head=TwoMLPHead(fpn_channels * 49, representation),
        box_predictor=FastRCNNPredictor(representation, num_classes + 1),
        rpn_pre_nms_top_n_train=2 * proposals, rpn_pre_nms_top_n_test=proposals,
        rpn_post_nms_top_n_train=proposals, rpn_post_nms_top_n_test=proposals // 2,
        rpn_batch_size_per_image=64, box_batch_size_per_image=64, box_detections_per_img=detections_per_img)
    return body, kwargs


@register("detect", "faster_rcnn", paper="Ren et al. 2015, arXiv:1506.01497", space=SPACE)
def faster_rcnn(num_classes: int, in_channels: int, image_size: int, backbone: str = "resnet",
                backbone_hparams: dict | None = {}, fpn_channels: int = 32, representation: int = 128,
                proposals: int = 100, detections_per_img: int = 20, strides: tuple[int, ...] = LEVEL_STRIDES,
                anchor_scales: tuple[float, ...] = ANCHOR_SCALES,
                aspect_ratios: tuple[float, ...] = ASPECT_RATIOS) -> FasterRCNN:
    """Faster R-CNN + FPN; `proposals` RPN proposals per image in training (half at test). Anchors of
    `anchor_scales` x stride and `aspect_ratios` at each of `strides` (plus a max-pooled level above)."""
    geometry = {"strides": strides, "anchor_scales": anchor_scales, "aspect_ratios": aspect_ratios}
    body, kwargs = two_stage_parts(num_classes, in_channels, image_size, backbone, backbone_hparams, fpn_channels,
                                   representation, proposals, detections_per_img, geometry)
    return with_input_transform(FasterRCNN(body, **kwargs), in_channels, image_size)
