"""Convolutional autoencoder (Hinton & Salakhutdinov 2006; denoising: Vincent et al. 2008): an encoder that is
a registry classifier's trunk, and a decoder of (upsample x2, 3x3 conv, BN, ReLU) blocks back to the input size.

The encoder keeps the classifier's stage names under `features`, so its trained weights initialise that
classifier's trunk (`train.classify.pretrained: reconstruct`, models/_checkpoint.py). The decoder upsamples
bilinearly then convolves (Odena et al. 2016, "Deconvolution and Checkerboard Artifacts"), and its last 1x1
conv gives the restored image in [0, 1] units, one channel per input channel.
"""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn import functional as F

from models._registry import Choice, register
from models._stages import stage_shapes, trunk

ENCODERS = ["lenet5", "resnet", "vgg", "mobilenet_v2"]


def up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Bilinear x2, then 3x3 conv, BN, ReLU: one decoder step."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                         nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class Autoencoder(nn.Module):
    """Encoder stages (`features`) -> decoder (`decoder`) -> 1x1 conv to the image's channels, at the input size."""

    def __init__(self, features: nn.Sequential, channels: int, stride: int, out_channels: int, width: int) -> None:
        super().__init__()
        self.features = features
        steps = max(0, round(math.log2(stride)))
        blocks, current = [], channels
        for i in range(steps):
            following = width * 2 ** (steps - 1 - i)
            blocks.append(up_block(current, following))
            current = following
        self.decoder = nn.Sequential(*blocks)
        self.output = nn.Conv2d(current, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        decoded = self.decoder(self.features(x))
        if decoded.shape[-2:] != x.shape[-2:]:  # strides that rounded odd sizes up or down
            decoded = F.interpolate(decoded, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.output(decoded)


@register("reconstruct", "autoencoder", paper="Vincent et al. 2008, doi:10.1145/1390156.1390294",
          space={"encoder": Choice(ENCODERS), "width": Choice([8, 16, 32])})
def autoencoder(num_classes: int, in_channels: int, image_size: int, encoder: str = "resnet",
                encoder_hparams: dict | None = {}, width: int = 16) -> Autoencoder:
    """The trunk of classifier `encoder` (its `encoder_hparams`) and a decoder with `width` channels at full size;
    `num_classes` is unused (the output has the input's channels)."""
    features = trunk(encoder, in_channels, image_size, encoder_hparams)
    channels, stride = stage_shapes(features, in_channels, image_size)[-1]
    return Autoencoder(features, channels, stride, in_channels, width)
