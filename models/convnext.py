"""ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s"): torchvision's ConvNeXt block (7x7
depthwise conv, LayerNorm, inverted 4x MLP, layer scale, stochastic depth), a patchify stem and
LayerNorm + 2x2 stride-2 convs between stages.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models.convnext import CNBlock, LayerNorm2d

from models._registry import Choice, FloatRange, register
from models._stages import StagedClassifier, stride_plan


@register("classify", "convnext", paper="Liu et al. 2022, arXiv:2201.03545",
          space={"width": Choice([16, 32, 48, 96]), "depth": Choice([1, 2, 3]),
                 "stochastic_depth": FloatRange(0.0, 0.2), "dropout": FloatRange(0.0, 0.5)})
def convnext(num_classes: int, in_channels: int, image_size: int, width: int = 32, depth: int = 1,
             stochastic_depth: float = 0.0, dropout: float = 0.0, layer_scale: float = 1.0) -> StagedClassifier:
    """Stages of (d, d, 3d, d) blocks with width x (1, 2, 4, 8) channels (depth 3, width 96 = ConvNeXt-T).
    `layer_scale` is each block's initial residual scale: the paper's 1e-6 suits AdamW over 300 epochs; under
    SGD a short run leaves its blocks at identity (one epoch of 10k items: 0.66 at 1e-6 and 0.1, 0.73 at 1)."""
    norm = partial(LayerNorm2d, eps=1e-6)
    # Stride points: the 4x4 patchify stem counts twice, then three downsampling layers.
    strides = stride_plan(image_size, 5)
    patch = strides[0] * strides[1]
    features = [nn.Sequential(nn.Conv2d(in_channels, width, patch, stride=patch), norm(width))]
    blocks = [depth, depth, 3 * depth, depth]
    total, done = sum(blocks), 0
    for i, count in enumerate(blocks):
        dim = width * 2 ** i
        stage = []
        if i:
            stride = strides[i + 1]  # 2x2 stride 2 conv, or a 1x1 that only widens on small inputs
            stage += [norm(dim // 2), nn.Conv2d(dim // 2, dim, stride, stride=stride)]
        for _ in range(count):
            stage.append(CNBlock(dim, layer_scale=layer_scale, stochastic_depth_prob=stochastic_depth * done / total))
            done += 1
        features.append(nn.Sequential(*stage))
    channels = width * 8
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), norm(channels), nn.Flatten(), nn.Dropout(dropout),
                         nn.Linear(channels, num_classes))
    return StagedClassifier(features, head)
