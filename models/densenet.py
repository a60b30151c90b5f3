"""DenseNet-BC (Huang et al. 2017, "Densely Connected Convolutional Networks"): torchvision's dense
blocks (each layer sees all earlier maps; 1x1 bottleneck of 4 x growth) and transitions that
compress the channels by `compression`.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.densenet import _DenseBlock, _Transition

from models._registry import Choice, FloatRange, register
from models._stages import StagedClassifier, stride_plan


@register("classify", "densenet", paper="Huang et al. 2017, arXiv:1608.06993",
          space={"growth_rate": Choice([8, 12, 16, 24, 32]), "layers": Choice([2, 4, 6, 8, 16]),
                 "compression": FloatRange(0.5, 1.0), "dropout": FloatRange(0.0, 0.2)},
          defaults={"growth_rate": 12, "layers": 4, "compression": 0.5, "dropout": 0.0})
def densenet(num_classes: int, in_channels: int, image_size: int, growth_rate: int = 12, layers: int = 4,
             compression: float = 0.5, dropout: float = 0.0) -> StagedClassifier:
    """Three dense blocks of `layers` layers (the paper's CIFAR layout: L = 6 * layers + 4)."""
    channels = 2 * growth_rate  # Huang et al. 2017, Sec. 4: the BC stem has twice the growth rate
    stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False))
    features = [stem]
    strides = stride_plan(image_size, 2)
    for i in range(3):
        block = _DenseBlock(layers, channels, bn_size=4, growth_rate=growth_rate, drop_rate=dropout)
        channels += layers * growth_rate
        stage = nn.Sequential(block)
        if i < 2:
            out = int(channels * compression)
            transition = _Transition(channels, out)
            if strides[i] == 1:  # too small to halve again: a transition that only compresses
                transition.pool = nn.Identity()
            stage.add_module("transition", transition)
            channels = out
        else:  # DenseNet ends with BN-ReLU before the global pooling
            stage.add_module("norm", nn.BatchNorm2d(channels))
            stage.add_module("relu", nn.ReLU(inplace=True))
        features.append(stage)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    return StagedClassifier(features, head)
