"""The backbone every detector shares: a registry classifier's `features` + a feature pyramid
(Lin et al. 2017, "Feature Pyramid Networks for Object Detection"), plus the settings that make
torchvision's detectors fit ConvForge's small, already-normalized scenes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from models._registry import Choice
from models._stages import stage_shapes, trunk
from models._errors import ConvForgeError

# Items of ~10-35 px on 32-128 px canvases: pyramid levels at strides 4, 8 and 16.
LEVEL_STRIDES = (4, 8, 16)
BACKBONES = ["resnet", "mobilenet_v2", "vgg", "efficientnet", "convnext"]
# The searched hparams every detector takes for its backbone (its own hparams come in `backbone_hparams`).
BACKBONE_SPACE = {"backbone": Choice(BACKBONES), "fpn_channels": Choice([32, 64, 128])}


class PyramidBackbone(nn.Module):
    """Runs `features` up to the last chosen stage and returns the FPN maps {"0": stride 4, "1": 8, ...}."""

    def __init__(self, features: nn.Sequential, levels: list[int], in_channels: list[int], out_channels: int) -> None:
        super().__init__()
        self.features = features[: levels[-1] + 1]  # stages past the coarsest level would be wasted work
        self.levels = levels
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        maps = OrderedDict()
        for i, stage in enumerate(self.features):
            x = stage(x)
            if i in self.levels:
                maps[str(len(maps))] = x
        return self.fpn(maps)


def pyramid_backbone(backbone: str, backbone_hparams: dict | None, in_channels: int, image_size: int,
                     fpn_channels: int, extra_pool: bool = False) -> PyramidBackbone:
    """Registry classifier `backbone` as an FPN backbone; the last stage of each stride in LEVEL_STRIDES is a level."""
    features = trunk(backbone, in_channels, image_size, backbone_hparams)
    shapes = stage_shapes(features, in_channels, image_size)
    last_of_stride = {stride: i for i, (_, stride) in enumerate(shapes)}
    levels = [last_of_stride[s] for s in LEVEL_STRIDES if s in last_of_stride]
    if len(levels) < 2:
        raise ConvForgeError(f"backbone {backbone} at {image_size} px has strides {[s for _, s in shapes]}; "
                         f"a detector needs at least two of {LEVEL_STRIDES}")
    model = PyramidBackbone(features, levels, [shapes[i][0] for i in levels], fpn_channels)
    if extra_pool:  # Faster/Mask R-CNN's RPN also looks at a max-pooled coarsest level
        model.fpn.extra_blocks = LastLevelMaxPool()
    return model


def level_strides(backbone: PyramidBackbone, image_size: int, in_channels: int) -> list[int]:
    """The stride of each map the backbone returns (measured, so extra pooled levels count too)."""
    import torch

    with torch.no_grad():
        was = backbone.training
        maps = backbone.eval()(torch.zeros(1, in_channels, image_size, image_size))
        backbone.train(was)
    return [2 ** max(0, round(math.log2(image_size / m.shape[-1]))) for m in maps.values()]


def transform_kwargs(in_channels: int, image_size: int) -> dict[str, Any]:
    """torchvision's internal resize and normalization turned off: inputs arrive at size and normalized."""
    return {"min_size": image_size, "max_size": image_size, "image_mean": [0.0] * in_channels,
            "image_std": [1.0] * in_channels, "size_divisible": 16}
