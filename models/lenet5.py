"""LeNet-5 (LeCun et al. 1998, "Gradient-Based Learning Applied to Document Recognition").

`classic`: tanh and average-pooling subsampling as published, with the sparse S2->C3 connection
table (Table I) as an option; `modern`: ReLU and max pooling. The output layer is linear (the
paper's RBF units are not used by anyone since).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models._registry import Choice, FloatRange, register
from models._stages import StagedClassifier

# LeCun et al. 1998, Table I: the S2 maps (0-5) each C3 map (0-15) reads.
C3_TABLE = [(0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 0), (5, 0, 1),
            (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (3, 4, 5, 0), (4, 5, 0, 1), (5, 0, 1, 2),
            (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5), (0, 1, 2, 3, 4, 5)]


class SparseConv2d(nn.Conv2d):
    """A convolution whose output map o reads only the input maps C3_TABLE[o % 16] (tiled for wider nets)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=padding)
        mask = torch.zeros(out_channels, in_channels, 1, 1)
        for o in range(out_channels):
            for i in range(in_channels):
                mask[o, i] = float(i % 6 in C3_TABLE[o % 16])
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


@register("classify", "lenet5", paper="LeCun et al. 1998, doi:10.1109/5.726791",
          space={"variant": Choice(["classic", "modern"]), "width": Choice([1, 2, 4]),
                 "sparse_c3": Choice([False, True]), "dropout": FloatRange(0.0, 0.5)})
def lenet5(num_classes: int, in_channels: int, image_size: int, variant: str = "modern", width: int = 1,
           sparse_c3: bool = False, dropout: float = 0.0) -> StagedClassifier:
    """C1-S2-C3-S4-C5-F6-output with `width` times the paper's 6/16/120/84 units."""
    if variant not in ("classic", "modern"):
        raise KeyError(f"lenet5 variant must be classic or modern, got {variant!r}")
    act = nn.Tanh if variant == "classic" else nn.ReLU
    pool = nn.AvgPool2d if variant == "classic" else nn.MaxPool2d
    c1, c3, c5, f6 = 6 * width, 16 * width, 120 * width, 84 * width
    # The paper pads 28x28 digits to 32x32; padding 2 keeps C1 at the input size for any input.
    size = image_size // 2  # after S2
    c3_pad = 0 if size >= 10 else 2  # keep 5x5 C3 valid on inputs under 20 px
    conv3 = SparseConv2d(c1, c3, 5, c3_pad) if sparse_c3 else nn.Conv2d(c1, c3, 5, padding=c3_pad)
    size = size - 4 + 2 * c3_pad
    s4 = pool(2, 2) if size >= 4 else nn.Identity()
    size = size // 2 if size >= 4 else size
    features = [
        nn.Sequential(nn.Conv2d(in_channels, c1, 5, padding=2), act()),  # C1
        nn.Sequential(pool(2, 2), conv3, act()),  # S2, C3
        nn.Sequential(s4, nn.Conv2d(c3, c5, min(5, size)), act()),  # S4, C5 (1x1 on 28-32 px inputs)
    ]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c5, f6), act(), nn.Dropout(dropout),
                         nn.Linear(f6, num_classes))  # F6, output
    return StagedClassifier(features, head)
