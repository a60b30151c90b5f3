"""VGG (Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for Large-Scale Image
Recognition"): stacks of 3x3 convolutions between 2x2 max-pools, configurations A/B/D/E
(VGG-11/13/16/19, torchvision's `cfgs`), optional BN (Ioffe & Szegedy 2015).
"""

from __future__ import annotations

from torch import nn
from torchvision.models.vgg import cfgs

from models._registry import Choice, FloatRange, register
from models._stages import StagedClassifier, scaled, stride_plan

LAYOUTS = {11: "A", 13: "B", 16: "D", 19: "E"}


# `batch_norm: False` (the paper's VGG) stays a builder argument but is not searched: at width 8 it stays at chance
# (val accuracy 0.10 after 1-3 epochs of 10k Fashion-MNIST items, SGD at lr 0.05 or 0.01), where with BN it
# reaches 0.74 after one.
@register("classify", "vgg", paper="Simonyan & Zisserman 2015, arXiv:1409.1556",
          space={"depth": Choice([11, 13, 16, 19]), "width": Choice([8, 16, 32, 64]),
                 "dropout": FloatRange(0.0, 0.5)})
def vgg(num_classes: int, in_channels: int, image_size: int, depth: int = 11, width: int = 16,
        batch_norm: bool = True, dropout: float = 0.5) -> StagedClassifier:
    """VGG-`depth` with `width` first-block channels (64 = the paper's); one stage per pooling block."""
    if depth not in LAYOUTS:
        raise KeyError(f"vgg depth must be one of {sorted(LAYOUTS)}, got {depth}")
    layout = cfgs[LAYOUTS[depth]]
    strides = iter(stride_plan(image_size, layout.count("M")))
    features, layers, channels = [], [], in_channels
    for item in layout:
        if item == "M":  # small inputs skip the first pools (stride_plan)
            if next(strides) == 2:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            features.append(nn.Sequential(*layers))
            layers = []
            continue
        out = scaled(item, width / 64)
        layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm))
        layers += [nn.BatchNorm2d(out), nn.ReLU(inplace=True)] if batch_norm else [nn.ReLU(inplace=True)]
        channels = out
    # The paper's 4096-4096 classifier, scaled with the width (64 -> 4096) and after global pooling.
    hidden = scaled(4096, width / 64)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, num_classes))
    return StagedClassifier(features, head)
