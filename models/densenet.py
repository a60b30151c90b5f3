"""DenseNet-BC (Huang et al. 2017, "Densely Connected Convolutional Networks"): dense blocks (each
layer sees all earlier maps; 1x1 bottleneck of 4 x growth) and transitions that compress the
channels by `compression`.

The blocks are torchvision's DenseNet layout written out (its classes are private), with the same
module names, so state_dict keys match torchvision's `features.denseblockN.denselayerM.*`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models._registry import Choice, FloatRange, register
from models._stages import StagedClassifier, stride_plan


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bn_size x growth) then BN-ReLU-3x3 conv (growth): Huang et al. 2017, Sec. 3 (BC)."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, inputs: list[Tensor]) -> Tensor:
        bottleneck = self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))
        out = self.conv2(self.relu2(self.norm2(bottleneck)))
        return F.dropout(out, p=self.drop_rate, training=self.training) if self.drop_rate > 0 else out


class DenseBlock(nn.ModuleDict):
    """`num_layers` dense layers, each fed the concatenation of the block's input and all earlier outputs."""

    def __init__(self, num_layers: int, in_channels: int, bn_size: int, growth_rate: int, drop_rate: float) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}",
                            DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, drop_rate))

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv (compression) and 2x2 average pooling between dense blocks (Sec. 3)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


@register("classify", "densenet", paper="Huang et al. 2017, arXiv:1608.06993",
          space={"growth_rate": Choice([8, 12, 16, 24, 32]), "layers": Choice([2, 4, 6, 8, 16]),
                 "compression": FloatRange(0.5, 1.0), "dropout": FloatRange(0.0, 0.2)})
def densenet(num_classes: int, in_channels: int, image_size: int, growth_rate: int = 12, layers: int = 4,
             compression: float = 0.5, dropout: float = 0.0) -> StagedClassifier:
    """Three dense blocks of `layers` layers (the paper's CIFAR layout: L = 6 * layers + 4)."""
    channels = 2 * growth_rate  # Huang et al. 2017, Sec. 4: the BC stem has twice the growth rate
    stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False))
    features = [stem]
    strides = stride_plan(image_size, 2)
    for i in range(3):
        block = DenseBlock(layers, channels, bn_size=4, growth_rate=growth_rate, drop_rate=dropout)
        channels += layers * growth_rate
        stage = nn.Sequential(block)
        if i < 2:
            out = int(channels * compression)
            transition = Transition(channels, out)
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
