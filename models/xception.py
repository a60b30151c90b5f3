"""Xception (Chollet 2017, "Xception: Deep Learning with Depthwise Separable Convolutions"):
depthwise-separable convolutions in residual blocks, entry / middle / exit flows (Fig. 5).
torchvision has no Xception, so the blocks are written out.
"""

from __future__ import annotations

from torch import Tensor, nn

from models._registry import Choice, FloatRange, IntRange, register
from models._stages import StagedClassifier, pooled_head, scaled, stride_plan


def separable(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 depthwise conv then 1x1 pointwise conv, no activation between them (Sec. 3), then BN."""
    return nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
                         nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))


class XceptionBlock(nn.Module):
    """ReLU-separable conv x `reps`, an optional 3x3/2 max-pool, plus a (projected) residual."""

    def __init__(self, in_channels: int, channels: list[int], stride: int, relu_first: bool = True) -> None:
        super().__init__()
        layers, c = [], in_channels
        for i, out in enumerate(channels):
            if i or relu_first:
                layers.append(nn.ReLU(inplace=False))  # not in place: the residual still needs x
            layers.append(separable(c, out))
            c = out
        if stride == 2:
            layers.append(nn.MaxPool2d(3, 2, padding=1))
        self.body = nn.Sequential(*layers)
        self.skip = (nn.Identity() if stride == 1 and in_channels == c else
                     nn.Sequential(nn.Conv2d(in_channels, c, 1, stride=stride, bias=False), nn.BatchNorm2d(c)))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + self.skip(x)


@register("classify", "xception", paper="Chollet 2017, arXiv:1610.02357",
          space={"width": Choice([8, 16, 32, 64]), "middle_blocks": IntRange(1, 8), "dropout": FloatRange(0.0, 0.5)})
def xception(num_classes: int, in_channels: int, image_size: int, width: int = 16, middle_blocks: int = 2,
             dropout: float = 0.0) -> StagedClassifier:
    """Xception with `width`/64 of the paper's channels and `middle_blocks` (8 in the paper) middle-flow blocks."""
    c = {n: scaled(n, width / 64) for n in (32, 64, 128, 256, 728, 1024, 1536, 2048)}
    s_stem, s1, s2, s3, s4 = stride_plan(image_size, 5)
    relu = nn.ReLU(inplace=True)
    stem = nn.Sequential(nn.Conv2d(in_channels, c[32], 3, s_stem, 1, bias=False), nn.BatchNorm2d(c[32]), relu,
                         nn.Conv2d(c[32], c[64], 3, padding=1, bias=False), nn.BatchNorm2d(c[64]),
                         nn.ReLU(inplace=True))
    entry = [XceptionBlock(c[64], [c[128]] * 2, s1, relu_first=False),
             XceptionBlock(c[128], [c[256]] * 2, s2), XceptionBlock(c[256], [c[728]] * 2, s3)]
    middle = [XceptionBlock(c[728], [c[728]] * 3, 1) for _ in range(middle_blocks)]
    exit_flow = [XceptionBlock(c[728], [c[728], c[1024]], s4),
                 nn.Sequential(separable(c[1024], c[1536]), nn.ReLU(inplace=True),
                               separable(c[1536], c[2048]), nn.ReLU(inplace=True))]
    features = [stem, nn.Sequential(entry[0]), nn.Sequential(entry[1]), nn.Sequential(entry[2], *middle),
                nn.Sequential(*exit_flow)]
    return StagedClassifier(features, pooled_head(c[2048], num_classes, dropout))
