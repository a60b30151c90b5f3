"""The backbone every detector shares: a registry classifier's `features` + a feature pyramid
(Lin et al. 2017, "Feature Pyramid Networks for Object Detection") at the strides a detector asks
for, plus the input transform that makes torchvision's detectors fit ConvForge's already-normalized
scenes and run each image at its own pixels.

Pyramid levels finer than the backbone's coarsest stage are that stride's last stage; coarser ones
are extra stride-2 convolutions on the coarsest map (RetinaNet's P6/P7, Lin et al. 2017b, "Focal
Loss for Dense Object Detection", which FCOS shares). `pipelines/geometry.py` chooses the strides
from the training boxes; the defaults (LEVEL_STRIDES) fit ~10-35 px items on 32-128 px canvases.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from models._registry import Choice
from models._stages import stage_shapes, trunk
from models._errors import ConvForgeError

# Items of ~10-35 px on 32-128 px canvases: pyramid levels at strides 4, 8 and 16.
LEVEL_STRIDES = (4, 8, 16)
BACKBONES = ["resnet", "mobilenet_v2", "vgg", "efficientnet", "convnext"]
# The searched hparams every detector takes for its backbone (its own hparams come in `backbone_hparams`).
BACKBONE_SPACE = {"backbone": Choice(BACKBONES), "fpn_channels": Choice([32, 64, 128])}


class CoarserLevels(ExtraFPNBlock):
    """`count` pyramid levels past the backbone's coarsest, each a 3x3 stride-2 conv of the one before (ReLU
    between, as RetinaNet's P6 -> P7), then optionally the max-pooled level Faster R-CNN's RPN looks at."""

    def __init__(self, channels: int, count: int, pool: bool) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(count))
        self.pool = pool

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        for i, conv in enumerate(self.convs):
            results.append(conv(F.relu(results[-1]) if i else results[-1]))
            names.append(str(len(names)))
        if self.pool:
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2))
            names.append("pool")
        return results, names


class PyramidBackbone(nn.Module):
    """Runs `features` up to the last chosen stage and returns the FPN maps {"0": finest, "1": next, ...}."""

    def __init__(self, features: nn.Sequential, levels: list[int], in_channels: list[int], out_channels: int,
                 strides: list[int] | None = None) -> None:
        super().__init__()
        self.features = features[: levels[-1] + 1]  # stages past the coarsest level would be wasted work
        self.levels = levels
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels)
        self.out_channels = out_channels
        self.strides = list(strides or [])  # of every map it returns, extra levels included

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        maps = OrderedDict()
        for i, stage in enumerate(self.features):
            x = stage(x)
            if i in self.levels:
                maps[str(len(maps))] = x
        return self.fpn(maps)


def pyramid_backbone(backbone: str, backbone_hparams: dict | None, in_channels: int, image_size: int,
                     fpn_channels: int, extra_pool: bool = False,
                     strides: Sequence[int] = LEVEL_STRIDES) -> PyramidBackbone:
    """Registry classifier `backbone` as an FPN backbone with a level at each of `strides` it can give.

    A stride the backbone has is its last stage of that stride; strides past its coarsest stage are
    extra convolutions (CoarserLevels); strides it skips (stride 4 on a stride-2-then-8 trunk, or
    small inputs whose stride plan stops early) are left out, and so are extra levels that would be
    under 2 px at `image_size`. At least two levels must come from the trunk.
    """
    features = trunk(backbone, in_channels, image_size, backbone_hparams)
    shapes = stage_shapes(features, in_channels, image_size)
    last_of_stride = {stride: i for i, (_, stride) in enumerate(shapes)}
    levels = [last_of_stride[s] for s in sorted(strides) if s in last_of_stride]
    if len(levels) < 2:  # extra levels only extend a pyramid the trunk itself starts
        raise ConvForgeError(f"backbone {backbone} at {image_size} px has strides {[s for _, s in shapes]}; "
                             f"a detector needs at least two of {tuple(strides)}")
    level_strides = [shapes[i][1] for i in levels]
    # Doublings past the trunk's levels, while their maps keep 2 px (a 1 px map breaks GroupNorm in training)
    extra = max(0, round(math.log2(max(strides) / level_strides[-1])))
    while extra and math.ceil(image_size / (level_strides[-1] * 2 ** extra)) < 2:
        extra -= 1
    level_strides += [level_strides[-1] * 2 ** k for k in range(1, extra + 1 + int(extra_pool))]
    model = PyramidBackbone(features, levels, [shapes[i][0] for i in levels], fpn_channels, level_strides)
    if extra:
        model.fpn.extra_blocks = CoarserLevels(fpn_channels, extra, extra_pool)
    elif extra_pool:  # Faster/Mask R-CNN's RPN also looks at a max-pooled coarsest level
        model.fpn.extra_blocks = LastLevelMaxPool()
    return model


def level_strides(backbone: PyramidBackbone, image_size: int, in_channels: int) -> list[int]:
    """The stride of each map the backbone returns, extra levels included (measured when it does not say)."""
    import torch

    if backbone.strides:
        return list(backbone.strides)
    with torch.no_grad():
        was = backbone.training
        maps = backbone.eval()(torch.zeros(1, in_channels, image_size, image_size))
        backbone.train(was)
    return [2 ** max(0, round(math.log2(image_size / m.shape[-1]))) for m in maps.values()]


class InputTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform without its normalization (inputs arrive normalized) and,
    when `native`, without its resize: each image runs at its own pixels, so a detector trained on
    64 px canvases finds the same items at the same size on a 128 px one."""

    def __init__(self, in_channels: int, image_size: int) -> None:
        super().__init__(image_size, image_size, [0.0] * in_channels, [1.0] * in_channels, size_divisible=16)
        self.native = True

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, Any]:
        if self.native:
            return image, target
        return super().resize(image, target)


def with_input_transform(model: nn.Module, in_channels: int, image_size: int) -> nn.Module:
    """`model` with its torchvision transform replaced by InputTransform (native scale); returns `model`."""
    model.transform = InputTransform(in_channels, image_size)
    return model


def set_input_size(model: nn.Module, size: int | None) -> nn.Module:
    """How a registry detector sizes its inputs; returns `model`.

    None (the builders' default): every image runs at its own pixels (native scale; a batch is padded
    to its largest image). An int: each image is resized so its longer side is `size`, torchvision's
    `min_size = max_size = size` (boxes come back in the input's pixels either way).
    """
    transform = getattr(model, "transform", None)
    if not isinstance(transform, InputTransform):
        raise TypeError(f"{type(model).__name__} is not a registry detector (no InputTransform)")
    transform.native = size is None
    if size is not None:
        transform.min_size, transform.max_size = (int(size),), int(size)
    return model
