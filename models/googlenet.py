"""GoogLeNet / Inception v1 (Szegedy et al. 2015, "Going Deeper with Convolutions"): torchvision's
inception modules (parallel 1x1, 3x3, 5x5 and pool branches with 1x1 reductions), auxiliary
classifiers after 4a and 4d whose losses count in training only, global average pooling.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.googlenet import BasicConv2d, Inception

from models._registry import AuxLogits, Choice, FloatRange, register
from models._stages import StagedClassifier, pooled_head, scaled, stride_plan

# Szegedy et al. 2015, Table 1: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
MODULES = {
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64), "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64), "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128), "5b": (384, 192, 384, 48, 128, 128),
}
AUX_AFTER = ("4a", "4d")


def aux_head(channels: int, num_classes: int, width: float) -> nn.Sequential:
    """Szegedy et al. 2015, Sec. 5: 4x4 average pool, 1x1 conv (128), FC (1024), dropout 0.7, FC."""
    conv, hidden = scaled(128, width), scaled(1024, width)
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), BasicConv2d(channels, conv, kernel_size=1), nn.Flatten(),
                         nn.Linear(conv * 16, hidden), nn.ReLU(inplace=True), nn.Dropout(0.7),
                         nn.Linear(hidden, num_classes))


class GoogLeNet(StagedClassifier):
    """Stem, inception stages 3/4/5 in `features`; in train mode also the auxiliary logits."""

    def __init__(self, features: list[nn.Module], head: nn.Module, aux: nn.ModuleDict) -> None:
        super().__init__(features, head)
        self.aux = aux

    def forward(self, x: Tensor) -> Tensor | AuxLogits:
        if not (self.training and len(self.aux)):
            return super().forward(x)
        aux = []
        for stage in self.features:
            for name, module in stage.named_children():
                x = module(x)
                if name in self.aux:
                    aux.append(self.aux[name](x))
        return AuxLogits(self.head(x), aux)


@register("classify", "googlenet", paper="Szegedy et al. 2015, arXiv:1409.4842",
          space={"width": Choice([0.125, 0.25, 0.5, 1.0]), "aux_logits": Choice([True, False]),
                 "dropout": FloatRange(0.0, 0.5)})
def googlenet(num_classes: int, in_channels: int, image_size: int, width: float = 0.25, aux_logits: bool = True,
              dropout: float = 0.4) -> GoogLeNet:
    """Inception v1 with `width` times the paper's channels and a stem for small inputs."""
    # Stride points: stem conv, stem pool, before 3a... kept to the paper's 32x on big inputs.
    s_conv, s_pool, s3, s4, s5 = stride_plan(image_size, 5)
    c1, c2 = scaled(64, width), scaled(192, width)
    stem = nn.Sequential(BasicConv2d(in_channels, c1, kernel_size=3, stride=s_conv, padding=1),
                         nn.MaxPool2d(3, 2, 1) if s_pool == 2 else nn.Identity(),
                         BasicConv2d(c1, c2, kernel_size=3, padding=1))
    stages, channels = [stem], c2
    aux = nn.ModuleDict()
    for group, stride in (("3", s3), ("4", s4), ("5", s5)):
        stage = nn.Sequential()
        stage.add_module("pool", nn.MaxPool2d(3, 2, 1) if stride == 2 else nn.Identity())
        for name, spec in MODULES.items():
            if name.startswith(group):
                b1, r3, b3, r5, b5, bp = (scaled(c, width) for c in spec)
                stage.add_module(name, Inception(channels, b1, r3, b3, r5, b5, bp))
                channels = b1 + b3 + b5 + bp
                if aux_logits and name in AUX_AFTER:
                    aux[name] = aux_head(channels, num_classes, width)
        stages.append(stage)
    return GoogLeNet(stages, pooled_head(channels, num_classes, dropout), aux)
