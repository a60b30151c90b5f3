"""SqueezeNet (Iandola et al. 2016, "SqueezeNet: AlexNet-level accuracy with 50x fewer
parameters"): torchvision's fire modules (1x1 squeeze, then 1x1 and 3x3 expand) in the v1.1
layout, and the paper's convolutional classifier (1x1 conv to classes, global average pool).
"""

from __future__ import annotations

from torch import nn
from torchvision.models.squeezenet import Fire

from models._registry import Choice, FloatRange, register
from models._stages import StagedClassifier, scaled, stride_plan

# torchvision's SqueezeNet 1.1: (squeeze, expand 1x1, expand 3x3) per fire module, pools between groups.
GROUPS = [[(16, 64, 64), (16, 64, 64)], [(32, 128, 128), (32, 128, 128)],
          [(48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256)]]


@register("classify", "squeezenet", paper="Iandola et al. 2016, arXiv:1602.07360",
          space={"width": Choice([0.5, 1.0]), "dropout": FloatRange(0.0, 0.2)})
def squeezenet(num_classes: int, in_channels: int, image_size: int, width: float = 1.0, batch_norm: bool = True,
               dropout: float = 0.2) -> StagedClassifier:
    """SqueezeNet 1.1 with `width` times its channels; stride points: stem conv and three pools. `batch_norm`
    (the default; False is the paper's net) normalizes the stem's and each fire module's output (Ioffe &
    Szegedy 2015). One epoch of 10k items at the shared training settings (SGD lr 0.05) ends at 0.12 without it
    (width 0.5, dropout 0.5), with it at 0.60 there, 0.65 at dropout 0.2, 0.73 at width 1 and chance at width
    0.25: hence the defaults and the searched ranges."""
    s_conv, *pools = stride_plan(image_size, 4)
    channels = scaled(64, width)

    def norm(channels: int) -> list[nn.Module]:
        return [nn.BatchNorm2d(channels)] if batch_norm else []

    features = [nn.Sequential(nn.Conv2d(in_channels, channels, 3, stride=s_conv, padding=1), *norm(channels),
                              nn.ReLU(inplace=True))]
    for group, stride in zip(GROUPS, pools):
        stage = [nn.MaxPool2d(3, 2, ceil_mode=True, padding=1) if stride == 2 else nn.Identity()]
        for squeeze, e1, e3 in group:
            stage.append(Fire(channels, scaled(squeeze, width), scaled(e1, width), scaled(e3, width)))
            channels = scaled(e1, width) + scaled(e3, width)
            stage += norm(channels)
        features.append(nn.Sequential(*stage))
    final = nn.Conv2d(channels, num_classes, 1)
    head = nn.Sequential(nn.Dropout(dropout), final, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = StagedClassifier(features, head)
    # torchvision's init: He-uniform convs, a near-zero classifier so the ReLU'd logits start alive.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.01) if module is final else nn.init.kaiming_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return model
