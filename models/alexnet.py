"""AlexNet (Krizhevsky et al. 2012, "ImageNet Classification with Deep Convolutional Neural
Networks"): ReLU, local response normalization, overlapping 3x3/2 max pooling, dropout in the
classifier. torchvision's AlexNet drops the LRN, so this one is written out.
"""

from __future__ import annotations

from torch import nn

from models._registry import Choice, FloatRange, register
from models._stages import StagedClassifier, scaled, stride_plan


def pool(stride: int) -> nn.Module:
    """The paper's overlapping pooling (3x3 windows, stride 2), or nothing where the input is too small."""
    return nn.MaxPool2d(3, 2, padding=1) if stride == 2 else nn.Identity()


@register("classify", "alexnet", paper="Krizhevsky et al. 2012, NeurIPS",
          space={"width": Choice([0.125, 0.25, 0.5, 1.0]), "lrn": Choice([True, False]),
                 "dropout": FloatRange(0.0, 0.6)})
def alexnet(num_classes: int, in_channels: int, image_size: int, width: float = 0.25, lrn: bool = True,
            dropout: float = 0.5) -> StagedClassifier:
    """Five convs (96-256-384-384-256 x `width`) and a 4096x`width` two-layer classifier."""
    c1, c2, c3, c4, c5 = (scaled(c, width) for c in (96, 256, 384, 384, 256))
    # The 11x11 stride-4 first conv only fits ImageNet-sized inputs; small ones get 5x5 stride 1.
    big = image_size >= 128
    s1, s2, s3 = stride_plan(image_size // 4 if big else image_size, 3)

    def norm(channels: int) -> nn.Module:
        # Krizhevsky et al. 2012, Sec. 3.3: k=2, n=5, alpha=1e-4, beta=0.75
        return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0) if lrn else nn.Identity()

    features = [
        nn.Sequential(nn.Conv2d(in_channels, c1, 11 if big else 5, 4 if big else 1, 2), nn.ReLU(inplace=True),
                      norm(c1), pool(s1)),
        nn.Sequential(nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(inplace=True), norm(c2), pool(s2)),
        nn.Sequential(nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(inplace=True),
                      nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(inplace=True),
                      nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(inplace=True), pool(s3)),
    ]
    hidden = scaled(4096, width)
    # Global pooling instead of the paper's 6x6 map: inputs here are 8-64 px (and it exports to ONNX).
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                         nn.Linear(c5, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
    model = StagedClassifier(features, head)
    # He et al. 2015 init for the ReLU convs (as torchvision's VGG): without BN, the paper's
    # N(0, 0.01) leaves a short run stuck at chance.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
    return model
