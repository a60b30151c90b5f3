"""ResNet (He et al. 2016, "Deep Residual Learning"): torchvision's basic and bottleneck blocks,
optional pre-activation (He et al. 2016, "Identity Mappings"), a stem sized to the input.

Stage layout and names follow torchvision's ResNet (stem conv/bn, four stages of blocks), so its
ImageNet weights load with `pretrained: torchvision:ResNet18_Weights.IMAGENET1K_V1` at width 64.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from models._registry import Choice, FloatRange, register
from models._stages import StagedClassifier, pooled_head, stride_plan

# depth -> (block, blocks per stage); He et al. 2016, Table 1 (14 and 26 are the bottleneck minis).
LAYOUTS = {
    10: ("basic", (1, 1, 1, 1)), 18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
    14: ("bottleneck", (1, 1, 1, 1)), 26: ("bottleneck", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice with a clean identity path (He et al. 2016, "Identity Mappings", Fig. 4e)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        shortcut = self.downsample(out) if self.downsample is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class PreActBottleneck(nn.Module):
    """Pre-activation 1x1-3x3-1x1 bottleneck (He et al. 2016, "Identity Mappings")."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(inplanes), nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3, self.conv3 = nn.BatchNorm2d(planes), nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        shortcut = self.downsample(out) if self.downsample is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + shortcut


def make_stage(block: type[nn.Module], inplanes: int, planes: int, blocks: int, stride: int,
               preact: bool) -> tuple[nn.Sequential, int]:
    """One stage of `blocks` residual blocks; a 1x1 projection where the shape changes (option B)."""
    outplanes = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != outplanes:
        layers = [nn.Conv2d(inplanes, outplanes, 1, stride, bias=False)]
        downsample = nn.Sequential(*layers) if preact else nn.Sequential(*layers, nn.BatchNorm2d(outplanes))
    stage = [block(inplanes, planes, stride, downsample)]
    stage += [block(outplanes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*stage), outplanes


@register("classify", "resnet", paper="He et al. 2016, arXiv:1512.03385",
          space={"depth": Choice([10, 14, 18, 26, 34, 50]), "width": Choice([8, 16, 32, 64]),
                 "preact": Choice([False, True]), "dropout": FloatRange(0.0, 0.5)})
def resnet(num_classes: int, in_channels: int, image_size: int, depth: int = 10, width: int = 16,
           preact: bool = False, dropout: float = 0.0) -> StagedClassifier:
    """ResNet-`depth` with `width` stem channels (64 = torchvision's)."""
    if depth not in LAYOUTS:
        raise KeyError(f"resnet depth must be one of {sorted(LAYOUTS)}, got {depth}")
    kind, layout = LAYOUTS[depth]
    block = {("basic", False): BasicBlock, ("basic", True): PreActBlock,
             ("bottleneck", False): Bottleneck, ("bottleneck", True): PreActBottleneck}[(kind, preact)]
    # Stride points: stem conv, stem max-pool, stages 2-4 (32x in all, as in the paper).
    conv_stride, pool_stride, *stage_strides = stride_plan(image_size, 5)
    kernel = 7 if image_size >= 128 else 3  # the 7x7 stem only pays off on ImageNet-sized inputs
    stem = [nn.Conv2d(in_channels, width, kernel, conv_stride, kernel // 2, bias=False)]
    if not preact:
        stem += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    stem.append(nn.MaxPool2d(3, 2, 1) if pool_stride == 2 else nn.Identity())
    features, channels = [nn.Sequential(*stem)], width
    for i, (blocks, stride) in enumerate(zip(layout, [1, *stage_strides])):
        stage, channels = make_stage(block, channels, width * 2 ** i, blocks, stride, preact)
        features.append(stage)
    if preact:  # pre-activation nets end with the BN-ReLU their last block left out
        features[-1].append(nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True)))
    return StagedClassifier(features, pooled_head(channels, num_classes, dropout))
