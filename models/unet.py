"""U-Net (Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical Image Segmentation"):
a contracting path, an expanding path, and skip connections that concatenate encoder features.

Padded convolutions (output at the input resolution, as in most re-implementations) and BN. `skips: false`
drops the skip connections (a plain encoder-decoder of the same depth): the ablation that shows what
they carry, searchable for both segmentation and reconstruction (denoising / inpainting).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models._registry import Choice, FloatRange, IntRange, register
from models._stages import stage_sides, stride_plan, trunk


def double_conv(in_channels: int, out_channels: int, dropout: float = 0.0) -> nn.Sequential:
    """(3x3 conv, BN, ReLU) twice: the unit of both paths (Ronneberger et al. 2015, Fig. 1)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True), nn.Dropout2d(dropout),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True))


class Up(nn.Module):
    """Upsample x2 (learned transposed conv or bilinear + 1x1 conv), concatenate the skip (when `skip`),
    double conv."""

    def __init__(self, in_channels: int, out_channels: int, upsample: str, skip: bool = True) -> None:
        super().__init__()
        self.bilinear, self.skip = upsample == "bilinear", skip
        self.up = (nn.Conv2d(in_channels, out_channels, 1) if self.bilinear
                   else nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2))
        self.conv = double_conv(2 * out_channels if skip else out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        if self.bilinear:
            x = self.up(F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False))
        else:  # ceil-mode pooling may have rounded odd sizes up: crop back to the skip's size
            x = self.up(x)[..., : skip.shape[-2], : skip.shape[-1]]
            if x.shape[-2:] != skip.shape[-2:]:  # a classifier trunk that skips a resolution (LeNet-5: 2 -> 8)
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([skip, x], dim=1) if self.skip else x)


class UNet(nn.Module):
    """Encoder stages in `features` (item 0 at full resolution), decoder in `decoder`, 1x1 `classifier` to
    `out_channels` (segment: background + classes; reconstruct: the image's channels)."""

    def __init__(self, out_channels: int, in_channels: int, depth: int, width: int, upsample: str,
                 dropout: float, skips: bool = True) -> None:
        super().__init__()
        widths = [width * 2 ** i for i in range(depth + 1)]
        stages = [double_conv(in_channels, widths[0])]
        for i in range(1, depth + 1):
            drop = dropout if i == depth else 0.0  # the paper's dropout sits at the end of the contracting path
            pool = nn.MaxPool2d(2, 2, ceil_mode=True)
            stages.append(nn.Sequential(pool, double_conv(widths[i - 1], widths[i], drop)))
        self.features = nn.Sequential(*stages)
        self.decoder = nn.ModuleList(Up(widths[i], widths[i - 1], upsample, skips) for i in range(depth, 0, -1))
        self.classifier = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for stage in self.features:
            x = stage(x)
            skips.append(x)
        for up, skip in zip(self.decoder, reversed(skips[:-1])):
            x = up(x, skip)
        return self.classifier(x)


class EncoderUNet(nn.Module):
    """U-Net whose contracting path is a registry classifier's trunk (`features`, as for every backbone): the last
    stage of each stride is a skip, each decoder step upsamples x2 to the next finer one and concatenates it (its
    channels), and the finest map is resized to the input before the 1x1 `classifier` (TernausNet, Iglovikov &
    Shvets 2018: a U-Net on a pretrained classifier's encoder)."""

    def __init__(self, features: nn.Sequential, in_channels: int, image_size: int, out_channels: int, upsample: str,
                 skips: bool) -> None:
        super().__init__()
        sides = stage_sides(features, in_channels, image_size)
        last_of_side = {side: i for i, (_, side) in enumerate(sides)}
        self.levels = [last_of_side[side] for side in sorted(last_of_side, reverse=True)]  # finest first
        self.features = features[: self.levels[-1] + 1]
        channels = [sides[i][0] for i in self.levels]
        self.decoder = nn.ModuleList(Up(channels[i], channels[i - 1], upsample, skips)
                                     for i in range(len(channels) - 1, 0, -1))
        self.classifier = nn.Conv2d(channels[0], out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        size, maps = x.shape[-2:], []
        for i, stage in enumerate(self.features):
            x = stage(x)
            if i in self.levels:
                maps.append(x)
        for up, skip in zip(self.decoder, reversed(maps[:-1])):
            x = up(x, skip)
        if x.shape[-2:] != size:  # a trunk whose stem already strides
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.classifier(x)


SPACE = {"depth": IntRange(2, 5), "width": Choice([8, 16, 32, 64]), "upsample": Choice(["transpose", "bilinear"]),
         "dropout": FloatRange(0.0, 0.5), "skips": Choice([True, False])}


def _depth(upsample: str, image_size: int, depth: int) -> int:
    """The poolings that fit `image_size` (at least one), after checking `upsample`."""
    if upsample not in ("transpose", "bilinear"):
        raise KeyError(f"unet upsample must be transpose or bilinear, got {upsample!r}")
    return max(1, stride_plan(image_size, depth).count(2))


@register("segment", "unet", paper="Ronneberger et al. 2015, arXiv:1505.04597", space=SPACE)
def unet(num_classes: int, in_channels: int, image_size: int, depth: int = 3, width: int = 16,
         upsample: str = "transpose", dropout: float = 0.0, skips: bool = True, encoder: str | None = None,
         encoder_hparams: dict | None = {}) -> UNet | EncoderUNet:
    """U-Net with `depth` poolings (fewer when the input is too small for them), `width` first-level channels;
    logits for background + `num_classes` classes. With `encoder` (a classifier family, its `encoder_hparams`)
    that classifier's trunk is the contracting path instead (`depth`, `width` and `dropout` then go unused):
    what `pretrained: classify` builds."""
    if encoder is None:
        return UNet(num_classes + 1, in_channels, _depth(upsample, image_size, depth), width, upsample, dropout,
                    skips)
    _depth(upsample, image_size, depth)  # checks `upsample`
    features = trunk(encoder, in_channels, image_size, encoder_hparams)
    return EncoderUNet(features, in_channels, image_size, num_classes + 1, upsample, skips)


@register("reconstruct", "unet", paper="Ronneberger et al. 2015, arXiv:1505.04597", space=SPACE)
def unet_image(num_classes: int, in_channels: int, image_size: int, depth: int = 2, width: int = 16,
               upsample: str = "transpose", dropout: float = 0.0, skips: bool = True) -> UNet:
    """The same U-Net giving the restored image in [0, 1] units (`in_channels` outputs; `num_classes` unused)."""
    return UNet(in_channels, in_channels, _depth(upsample, image_size, depth), width, upsample, dropout, skips)
