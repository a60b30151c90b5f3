"""What every classifier family shares: a trunk of stages under `features`, a head, and a stride plan
that keeps small inputs (8-64 px) from being downsampled to nothing.

Detectors and segmenters reuse a classifier's `features` as their backbone, and transfer learning
matches weights by their name below `features.` (see models/_checkpoint.py).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn


def stride_plan(image_size: int, points: int, min_size: int = 2) -> list[int]:
    """Strides (1 or 2) for `points` places that may halve the resolution, in order.

    Only as many halvings as keep the last feature map at least `min_size` px stay; the first
    ones go (the CIFAR-style adaptation: small inputs keep their resolution early on).
    """
    fits = 0
    while fits < points and math.ceil(image_size / 2 ** (fits + 1)) >= min_size:
        fits += 1
    return [1] * (points - fits) + [2] * fits


def scaled(channels: float, mult: float, divisor: int = 1) -> int:
    """`channels * mult`, rounded to a multiple of `divisor`, at least `divisor`."""
    return max(divisor, int(round(channels * mult / divisor)) * divisor)


class StagedClassifier(nn.Module):
    """stem + stages (`features`, a Sequential whose item 0 is the stem) -> `head` -> logits [N, C]."""

    def __init__(self, features: Sequence[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.features = nn.Sequential(*features)
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def pooled_head(channels: int, num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    """Global average pooling, dropout, linear: the head of most modern CNNs (Lin et al. 2014)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes))


@torch.no_grad()
def stage_sides(features: nn.Sequential, in_channels: int, image_size: int) -> list[tuple[int, int]]:
    """(channels, side in px) of each stage's output, found by one forward pass of a blank image."""
    was_training = features.training
    features.eval()  # BN in train mode refuses 1x1 maps of a single image
    x = torch.zeros(1, in_channels, image_size, image_size, device=next(features.parameters()).device)
    sides = []
    for stage in features:
        x = stage(x)
        sides.append((x.shape[1], x.shape[-1]))
    features.train(was_training)
    return sides


def stage_shapes(features: nn.Sequential, in_channels: int, image_size: int) -> list[tuple[int, int]]:
    """(channels, stride) of each stage's output, the stride rounded to a power of two."""
    return [(channels, 2 ** max(0, round(math.log2(image_size / side))))
            for channels, side in stage_sides(features, in_channels, image_size)]


def trunk(backbone: str, in_channels: int, image_size: int, backbone_hparams: dict | None) -> nn.Sequential:
    """The `features` of registry classifier `backbone`, the trunk of a detector or segmenter.

    Its stride plan is made for `image_size`, or for `backbone_hparams["image_size"]` when given: a classifier
    trained on 28 px items keeps its strides on 64 px scenes, so its stages see the items at the scale they
    learned them (the same weights at a coarser plan would see them at half the size).
    """
    from models._errors import ConvForgeError
    from models._registry import BACKBONE_TASK, build

    hparams = dict(backbone_hparams or {})
    planned = hparams.pop("image_size", image_size)
    model = build(BACKBONE_TASK, backbone, 1, in_channels, planned, **hparams)
    if not isinstance(getattr(model, "features", None), nn.Sequential):
        raise ConvForgeError(f"{BACKBONE_TASK} family {backbone!r} has no `features` stages to serve as a backbone")
    return model.features


def trunk_to_stride(backbone: str, in_channels: int, image_size: int, backbone_hparams: dict | None,
                    output_stride: int) -> tuple[nn.Sequential, int]:
    """The backbone's stages up to the last one at most `output_stride` coarse, and its channel count."""
    features = trunk(backbone, in_channels, image_size, backbone_hparams)
    shapes = stage_shapes(features, in_channels, image_size)
    last = max(i for i, (_, stride) in enumerate(shapes) if stride <= output_stride or i == 0)
    return features[: last + 1], shapes[last][0]


class SegmentationModel(nn.Module):
    """Backbone stages (`features`) -> a torchvision head -> logits upsampled to the input size."""

    def __init__(self, features: nn.Sequential, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        logits = self.head(self.features(x))
        return nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
