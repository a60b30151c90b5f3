"""MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks"):
torchvision's inverted residual blocks (1x1 expand, 3x3 depthwise, linear 1x1 project) in the
paper's layout (Table 2), with a width multiplier and strides fitted to small inputs.
"""

from __future__ import annotations

import math

from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.ops.misc import Conv2dNormActivation

from models._registry import Choice, FloatRange, register
from models._stages import StagedClassifier, pooled_head, stride_plan

# Sandler et al. 2018, Table 2: expansion t, channels c, repeats n, stride s.
LAYOUT = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def round_channels(channels: float, divisor: int = 8) -> int:
    """`channels` rounded to the nearest multiple of `divisor`, never more than 10% below it: the
    rounding of the TensorFlow MobileNet reference (Sandler et al. 2018's code, slim/nets/mobilenet)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


@register("classify", "mobilenet_v2", paper="Sandler et al. 2018, arXiv:1801.04381",
          space={"width_mult": Choice([0.25, 0.35, 0.5, 0.75, 1.0]), "depth_mult": Choice([0.5, 0.75, 1.0]),
                 "dropout": FloatRange(0.0, 0.5)})
def mobilenet_v2(num_classes: int, in_channels: int, image_size: int, width_mult: float = 0.35,
                 depth_mult: float = 0.5, dropout: float = 0.2) -> StagedClassifier:
    """MobileNetV2 x`width_mult`, each row repeated ceil(n x `depth_mult`) times."""
    # Stride points: the stem and the four strided rows (32x in all).
    stem_stride, *row_strides = stride_plan(image_size, 5)
    row_strides = iter(row_strides)
    channels = round_channels(32 * width_mult)
    stem = Conv2dNormActivation(in_channels, channels, stride=stem_stride, activation_layer=nn.ReLU6)
    features, stage = [stem], []
    for t, c, n, s in LAYOUT:
        out = round_channels(c * width_mult)
        stride = next(row_strides) if s == 2 else 1
        if s == 2 and stage:  # a new stage at each place the resolution may halve
            features.append(nn.Sequential(*stage))
            stage = []
        for i in range(max(1, math.ceil(n * depth_mult))):
            stage.append(InvertedResidual(channels, out, stride if i == 0 else 1, expand_ratio=t))
            channels = out
    last = round_channels(1280 * max(1.0, width_mult))  # the paper keeps 1280 for multipliers < 1
    stage.append(Conv2dNormActivation(channels, last, kernel_size=1, activation_layer=nn.ReLU6))
    features.append(nn.Sequential(*stage))
    return StagedClassifier(features, pooled_head(last, num_classes, dropout))
