"""FCN (Long et al. 2015, "Fully Convolutional Networks for Semantic Segmentation"): torchvision's
FCNHead on a registry classifier's stages, bilinearly upsampled to the input resolution.
"""

from __future__ import annotations

from torchvision.models.segmentation.fcn import FCNHead

from models._registry import Choice, register
from models._stages import SegmentationModel, trunk_to_stride

BACKBONES = ["resnet", "mobilenet_v2", "vgg", "efficientnet", "convnext", "densenet"]


@register("segment", "fcn", paper="Long et al. 2015, arXiv:1411.4038",
          space={"backbone": Choice(BACKBONES), "output_stride": Choice([4, 8, 16])})
def fcn(num_classes: int, in_channels: int, image_size: int, backbone: str = "resnet",
        backbone_hparams: dict | None = {}, output_stride: int = 8) -> SegmentationModel:
    """FCN head on `backbone`'s stages up to `output_stride` (later stages are left out)."""
    features, channels = trunk_to_stride(backbone, in_channels, image_size, backbone_hparams,
                                         output_stride)
    return SegmentationModel(features, FCNHead(channels, num_classes + 1))
