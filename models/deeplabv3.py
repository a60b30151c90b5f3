"""DeepLabV3 (Chen et al. 2017, "Rethinking Atrous Convolution for Semantic Image Segmentation"):
torchvision's DeepLabHead (atrous spatial pyramid pooling + image pooling) on a registry
classifier's stages, with atrous rates sized for small feature maps.
"""

from __future__ import annotations

from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from models.fcn import BACKBONES
from models._registry import Choice, register
from models._stages import SegmentationModel, trunk_to_stride

# The paper's rates (6, 12, 18) at output stride 16 suit 33x33 maps; ConvForge's are 4-16 px wide.
RATES = {"small": (1, 2, 3), "medium": (2, 4, 6), "paper": (6, 12, 18)}


@register("segment", "deeplabv3", paper="Chen et al. 2017, arXiv:1706.05587",
          space={"backbone": Choice(BACKBONES), "output_stride": Choice([4, 8, 16]),
                 "atrous_rates": Choice(list(RATES))})
def deeplabv3(num_classes: int, in_channels: int, image_size: int, backbone: str = "resnet",
              backbone_hparams: dict | None = {}, output_stride: int = 8,
              atrous_rates: str = "small") -> SegmentationModel:
    """ASPP head on `backbone`'s stages up to `output_stride` (its image-pooling BN needs training batches > 1)."""
    if atrous_rates not in RATES:
        raise KeyError(f"deeplabv3 atrous_rates must be one of {sorted(RATES)}, got {atrous_rates!r}")
    features, channels = trunk_to_stride(backbone, in_channels, image_size, backbone_hparams,
                                         output_stride)
    return SegmentationModel(features, DeepLabHead(channels, num_classes + 1, RATES[atrous_rates]))
