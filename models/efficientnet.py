"""EfficientNet (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for CNNs"): torchvision's
MBConv blocks (inverted residual + squeeze-and-excitation, SiLU, stochastic depth) in the B0
layout, scaled by the compound coefficient phi: depth 1.2^phi, width 1.1^phi (Eq. 3).
"""

from __future__ import annotations

import copy
from functools import partial

from torch import nn
from torchvision.models.efficientnet import MBConv, MBConvConfig
from torchvision.ops.misc import Conv2dNormActivation

from models._registry import FloatRange, IntRange, register
from models._stages import StagedClassifier, pooled_head, stride_plan

# Tan & Le 2019, Table 1 (B0): expand ratio, kernel, stride, in, out, layers.
B0 = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
      (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]
ALPHA, BETA = 1.2, 1.1  # depth and width bases found by the paper's grid search


@register("classify", "efficientnet", paper="Tan & Le 2019, arXiv:1905.11946",
          space={"phi": IntRange(-8, 3), "dropout": FloatRange(0.1, 0.5), "stochastic_depth": FloatRange(0.0, 0.2)})
def efficientnet(num_classes: int, in_channels: int, image_size: int, phi: int = -6, dropout: float = 0.2,
                 stochastic_depth: float = 0.0) -> StagedClassifier:
    """EfficientNet-B0 scaled by compound coefficient `phi` (0 = B0; negative = smaller, for CPUs)."""
    config = partial(MBConvConfig, width_mult=BETA ** phi, depth_mult=ALPHA ** phi)
    rows = [config(*row) for row in B0]
    strides = iter(stride_plan(image_size, 5))
    # The TF reference's eps 1e-3, but PyTorch's default momentum 0.1, not TF's 0.01 (decay 0.99): at 0.01 the
    # running statistics of a short run (one epoch of 10k items is 78 steps) keep half their initial (0, 1),
    # and eval-mode predictions stay at chance; 0.01 suits ImageNet's ~10^5-10^6 steps only.
    norm = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.1)
    stem = Conv2dNormActivation(in_channels, rows[0].input_channels, 3, stride=next(strides), norm_layer=norm,
                                activation_layer=nn.SiLU)
    features, stage = [stem], []
    total, done = sum(row.num_layers for row in rows), 0
    for row in rows:
        if row.stride == 2:
            row.stride = next(strides)
            features.append(nn.Sequential(*stage))  # a new stage where the resolution may halve
            stage = []
        for i in range(row.num_layers):
            block = copy.copy(row)
            if i:
                block.input_channels, block.stride = block.out_channels, 1
            stage.append(MBConv(block, stochastic_depth * done / total, norm))  # linearly growing drop rate
            done += 1
    last = 4 * rows[-1].out_channels
    stage.append(Conv2dNormActivation(rows[-1].out_channels, last, 1, norm_layer=norm, activation_layer=nn.SiLU))
    features.append(nn.Sequential(*stage))
    return StagedClassifier(features, pooled_head(last, num_classes, dropout))
