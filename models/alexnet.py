"""AlexNet (Krizhevsky et al. 2012, "ImageNet Classification with Deep Convolutional Neural
Networks"): ReLU, local response normalization, overlapping 3x3/2 max pooling, dropout in the
classifier. torchvision's AlexNet drops the LRN, so this one is written out; batch norm in place of the
LRN is the default (see `alexnet`).
"""

from __future__ import annotations

from torch import nn

from models._registry import Choice, FloatRange, register
from models._stages import StagedClassifier, scaled, stride_plan


def pool(stride: int) -> nn.Module:
    """The paper's overlapping pooling (3x3 windows, stride 2), or nothing where the input is too small."""
    return nn.MaxPool2d(3, 2, padding=1) if stride == 2 else nn.Identity()


@register("classify", "alexnet", paper="Krizhevsky et al. 2012, NeurIPS",
          space={"width": Choice([0.125, 0.25, 0.5, 1.0]), "dropout": FloatRange(0.0, 0.1)})
def alexnet(num_classes: int, in_channels: int, image_size: int, width: float = 0.25, norm: str = "batch",
            dropout: float = 0.0) -> StagedClassifier:
    """Five convs (96-256-384-384-256 x `width`) and a 4096x`width` two-layer classifier; `norm` "lrn" is the
    paper's local response normalization after the first two convs, "batch" (the default) batch norm after
    every conv (Ioffe & Szegedy 2015). At the shared training settings (SGD lr 0.05) one epoch of 10k items
    ends at chance with the paper's LRN and dropout 0.5, at 0.24 with batch norm and dropout 0.5, 0.56 at
    dropout 0.25 and 0.74 without dropout: the default and the searched range keep it low."""
    c1, c2, c3, c4, c5 = (scaled(c, width) for c in (96, 256, 384, 384, 256))
    # The 11x11 stride-4 first conv only fits ImageNet-sized inputs; small ones get 5x5 stride 1.
    big = image_size >= 128
    s1, s2, s3 = stride_plan(image_size // 4 if big else image_size, 3)

    if norm not in ("batch", "lrn"):
        raise ValueError(f"alexnet norm: expected batch or lrn, got {norm!r}")

    def conv(cin: int, cout: int, kernel: int, stride: int = 1, lrn: bool = False) -> list[nn.Module]:
        padding = min(2, kernel // 2)  # the paper's 11x11 stride-4 conv pads 2 (as torchvision's)
        if norm == "batch":
            return [nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]
        # Krizhevsky et al. 2012, Sec. 3.3: k=2, n=5, alpha=1e-4, beta=0.75, after the ReLU of convs 1 and 2
        local = [nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)] if lrn else []
        return [nn.Conv2d(cin, cout, kernel, stride, padding), nn.ReLU(inplace=True), *local]

    features = [
        nn.Sequential(*conv(in_channels, c1, 11 if big else 5, 4 if big else 1, lrn=True), pool(s1)),
        nn.Sequential(*conv(c1, c2, 5, lrn=True), pool(s2)),
        nn.Sequential(*conv(c2, c3, 3), *conv(c3, c4, 3), *conv(c4, c5, 3), pool(s3)),
    ]
    hidden = scaled(4096, width)
    # Global pooling instead of the paper's 6x6 map: inputs here are 8-64 px (and it exports to ONNX).
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                         nn.Linear(c5, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
    model = StagedClassifier(features, head)
    # He et al. 2015 init for every ReLU layer (as torchvision's VGG does for its convs): the paper's N(0, 0.01)
    # shrinks the signal about 4x in each of the classifier's layers and leaves a short run at chance; only
    # the last layer starts that small.
    last = head[-1]
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module is not last:
            nn.init.kaiming_normal_(module.weight, mode="fan_out" if isinstance(module, nn.Conv2d) else "fan_in",
                                    nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.normal_(last.weight, 0.0, 0.01)
    nn.init.zeros_(last.bias)
    return model
