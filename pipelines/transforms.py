"""The augmentation policy of `augment.policy`, built from torchvision.transforms.v2.

`strength` (TrainConfig.aug_strength) scales every magnitude and probability: 0 gives the
identity, 1 the policy as written, 2 twice as strong (probabilities capped at 1).
The transforms draw from torch's global RNG (as torchvision's do): seed it, or use
`apply_policy`, which forks the RNG and seeds it for reproducible batches.

Scenes may also be zoomed in and out (`scale_jitter`, multi-scale training as in Ren et al. 2015,
Sec. 4.1.1 and Redmon & Farhadi 2017, Sec. 2): the canvas keeps its size, the items change theirs,
so a detector sees each item at more sizes than the scenes were composed with.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from pipelines.params import PolicyParams


def _affine(policy: PolicyParams, strength: float) -> list[v2.Transform]:
    degrees = policy.rotation_deg * strength
    translate = min(1.0, policy.translate * strength)
    if degrees <= 0 and translate <= 0:
        return []
    return [v2.RandomAffine(degrees=min(180.0, degrees), translate=(translate, translate) if translate > 0 else None)]


def _color(policy: PolicyParams, in_channels: int, strength: float) -> list[v2.Transform]:
    jitter = min(1.0, policy.color_jitter * strength)
    if in_channels != 3 or jitter <= 0:
        return []  # colour jitter is for RGB data only
    return [v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=min(0.5, jitter / 4))]


def _zoom(policy: PolicyParams, strength: float) -> list[v2.Transform]:
    """Zoom by a factor in `scale_jitter` (its log scaled by `strength`) about the canvas centre; bilinear
    for the image, nearest for the masks (torchvision's Mask kernels)."""
    low, high = (factor ** strength for factor in policy.scale_jitter)
    if low == high == 1.0:
        return []
    return [v2.RandomAffine(degrees=0.0, scale=(low, high), interpolation=v2.InterpolationMode.BILINEAR)]


def _flip(policy: PolicyParams, strength: float) -> list[v2.Transform]:
    p = min(1.0, policy.hflip * strength)
    return [v2.RandomHorizontalFlip(p)] if p > 0 else []


def build_policy(policy: PolicyParams, image_size: int, in_channels: int,
                 strength: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-sample augmentation of a uint8 [C, H, W] tensor (classification), returning uint8 [C, H, W]."""
    steps: list[v2.Transform] = []
    padding = round(policy.crop_padding * strength)
    if padding > 0:
        steps.append(v2.RandomCrop(image_size, padding=padding))
    steps += _flip(policy, strength) + _affine(policy, strength) + _color(policy, in_channels, strength)
    erasing = min(1.0, policy.erasing * strength)
    if erasing > 0:
        steps.append(v2.RandomErasing(p=erasing, value=0))
    return v2.Compose(steps) if steps else v2.Identity()


class ScenePolicy:
    """Zoom + flip + small affine (+ colour jitter for RGB) applied jointly to a scene image and its target.

    Call with (image uint8 [C, H, W], target {"boxes", "labels", "masks" [k, H, W], optional
    "semantic" [H, W]}). Boxes are recomputed tight around the transformed instance masks
    (pixel-edge xyxy) and instances whose mask leaves the canvas are dropped.
    """

    def __init__(self, transform: v2.Transform):
        self.transform = transform

    def __call__(self, image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        masks = tv_tensors.Mask(target["masks"])
        semantic = tv_tensors.Mask(target["semantic"]) if "semantic" in target else None
        out_image, out_masks, out_semantic = self.transform(tv_tensors.Image(image), masks, semantic)
        out_masks = out_masks.as_subclass(torch.Tensor)
        keep = out_masks.flatten(1).ne(0).any(1) if len(out_masks) else torch.zeros(0, dtype=torch.bool)
        out_masks = out_masks[keep]
        result = {**target, "masks": out_masks, "labels": target["labels"][keep], "boxes": masks_to_boxes(out_masks)}
        if semantic is not None:
            result["semantic"] = out_semantic.as_subclass(torch.Tensor)
        return out_image.as_subclass(torch.Tensor), result

    def semantic(self, image: torch.Tensor, semantic: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image and its class-index mask [H, W] alone, as `__call__` would transform them from the same random
        state (one draw per call), without the instance masks and boxes segmentation does not train on."""
        out_image, out_semantic = self.transform(tv_tensors.Image(image), tv_tensors.Mask(semantic))
        return out_image.as_subclass(torch.Tensor), out_semantic.as_subclass(torch.Tensor)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight float32 xyxy boxes in pixel-edge coordinates (x2 = last column + 1) of masks [k, H, W]."""
    from torchvision.ops import masks_to_boxes as inclusive_boxes

    if len(masks) == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    return inclusive_boxes(masks.bool()).float() + torch.tensor([0.0, 0.0, 1.0, 1.0])


def build_scene_policy(policy: PolicyParams, image_size: int, in_channels: int,
                       strength: float = 1.0) -> ScenePolicy:
    """Joint scene augmentation (zoom, flip, rotation/translation, colour jitter) from the same policy params.

    Crop padding and random erasing are left out for scenes: they would cut objects
    without telling the targets. `image_size` is the canvas size (a zoom keeps it).
    """
    steps = _zoom(policy, strength) + _flip(policy, strength) + _affine(policy, strength)
    steps += _color(policy, in_channels, strength)
    return ScenePolicy(v2.Compose(steps) if steps else v2.Identity())


def apply_policy(transform: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, seed: int) -> torch.Tensor:
    """Apply a per-sample `transform` to each of `images` [N, C, H, W]; same seed, same output.

    The global torch RNG is forked, so the caller's random state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([transform(image) for image in images]) if len(images) else images.clone()
