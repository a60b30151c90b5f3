"""Mask R-CNN (He et al. 2017, "Mask R-CNN"): Faster R-CNN (models/faster_rcnn.py) plus
torchvision's mask branch, a small FCN predicting a 28x28 mask per detected box.
"""

from __future__ import annotations

from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from models._pyramid import LEVEL_STRIDES, with_input_transform
from models.faster_rcnn import ANCHOR_SCALES, ASPECT_RATIOS, SPACE, two_stage_parts
from models._registry import Choice, register
from models._roi_align import SeparableRoIAlign


@register("detect", "mask_rcnn", paper="He et al. 2017, arXiv:1703.06870",
          space={**SPACE, "mask_channels": Choice([32, 64, 128])})
def mask_rcnn(num_classes: int, in_channels: int, image_size: int, backbone: str = "resnet",
              backbone_hparams: dict | None = {}, fpn_channels: int = 32, representation: int = 128,
              proposals: int = 100, detections_per_img: int = 20, mask_channels: int = 64,
              strides: tuple[int, ...] = LEVEL_STRIDES, anchor_scales: tuple[float, ...] = ANCHOR_SCALES,
              aspect_ratios: tuple[float, ...] = ASPECT_RATIOS) -> MaskRCNN:
    """Mask R-CNN + FPN; targets need `masks` in training, outputs carry `masks` [k, 1, H, W] in [0, 1].
    The geometry hparams are Faster R-CNN's (models/faster_rcnn.py)."""
    geometry = {"strides": strides, "anchor_scales": anchor_scales, "aspect_ratios": aspect_ratios}
    body, kwargs = two_stage_parts(num_classes, in_channels, image_size, backbone, backbone_hparams, fpn_channels,
                                   representation, proposals, detections_per_img, geometry)
    names = kwargs["box_roi_pool"].featmap_names
    # The paper's head has four 3x3 convs at 256 channels; two narrower ones keep CPUs fast.
    model = MaskRCNN(body, mask_roi_pool=SeparableRoIAlign(names, output_size=14, sampling_ratio=2),
                     mask_head=MaskRCNNHeads(fpn_channels, [mask_channels] * 2, 1),
                     mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1), **kwargs)
    return with_input_transform(model, in_channels, image_size)
