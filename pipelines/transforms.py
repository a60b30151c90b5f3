"""The augmentation policy of `augment.policy`, built from torchvision.transforms.v2.

`strength` (TrainConfig.aug_strength) scales every magnitude and probability: 0 gives the
identity, 1 the policy as written, 2 twice as strong (probabilities capped at 1).
The transforms draw from torch's global RNG (as torchvision's do): seed it, or use
`apply_policy`, which forks the RNG and seeds it for reproducible batches.

A policy of crop and flip alone (the default) is `CropFlip`: torchvision's two steps, done for a whole
batch in one gather with the same random draws, in the same order, as the steps one item at a time.

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


def _flip_probability(policy: PolicyParams, strength: float) -> float:
    return min(1.0, policy.hflip * strength)


def _flip(p: float) -> list[v2.Transform]:
    return [v2.RandomHorizontalFlip(p)] if p > 0 else []


def _crop(image_size: int, padding: int) -> list[v2.Transform]:
    return [v2.RandomCrop(image_size, padding=padding)] if padding > 0 else []


class CropFlip:
    """`v2.RandomCrop(size, padding)` then `v2.RandomHorizontalFlip(p)` (either may be off), for one item
    [C, H, W] or, through `batch`, a whole uint8 batch [B, C, H, W] in one gather.

    Item by item it draws what those steps draw from torch's global RNG, in their order (the crop's top and
    left, then the flip's coin), so its output is theirs to the bit, at about a tenth of their time on 28 px
    items, where each step's per-call overhead outweighs its pixel work. Items of another size than the
    crop's go through the torchvision steps themselves.
    """

    def __init__(self, size: int, padding: int, p: float):
        self.size, self.padding, self.p = size, padding, p
        self._p32 = torch.tensor(p, dtype=torch.float32).item()  # what the flip compares its float32 draw with
        self.steps = v2.Compose(_crop(size, padding) + _flip(p))

    def __repr__(self) -> str:
        return f"CropFlip({self.steps})"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.batch(image[None])[0]

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """Each of `images` [B, C, H, W] augmented as one call per item would, in item order."""
        n, channels, height, width = images.shape
        if n == 0 or (height, width) != (self.size, self.size):
            return torch.stack([self.steps(image) for image in images]) if n else images.clone()
        pad, span = self.padding, 2 * self.padding + 1
        tops, lefts, flips = [0] * n, [0] * n, [False] * n
        for i in range(n):  # one item's draws after another's, as the per-item steps make them
            if pad:
                tops[i] = torch.randint(0, span, size=()).item()
                lefts[i] = torch.randint(0, span, size=()).item()
            if self.p > 0:
                flips[i] = torch.rand(1).item() < self._p32  # RandomHorizontalFlip skips when rand >= p
        device = images.device
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad)) if pad else images
        columns = torch.arange(width, device=device)
        rows = torch.tensor(tops, device=device)[:, None] + torch.arange(height, device=device)
        cols = torch.tensor(lefts, device=device)[:, None] + torch.where(
            torch.tensor(flips, device=device)[:, None], width - 1 - columns, columns)
        index = (rows[:, :, None] * (width + 2 * pad) + cols[:, None, :]).flatten(1)
        picked = padded.flatten(2).gather(2, index[:, None, :].expand(n, channels, height * width))
        return picked.view(n, channels, height, width)


def build_policy(policy: PolicyParams, image_size: int, in_channels: int,
                 strength: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-sample augmentation of a uint8 [C, H, W] tensor (classification), returning uint8 [C, H, W];
    crop and flip alone give `CropFlip`, which also augments whole batches."""
    padding = round(policy.crop_padding * strength)
    rest = _affine(policy, strength) + _color(policy, in_channels, strength)
    erasing = min(1.0, policy.erasing * strength)
    if erasing > 0:
        rest.append(v2.RandomErasing(p=erasing, value=0))
    flip = _flip_probability(policy, strength)
    if not rest and (padding > 0 or flip > 0):
        return CropFlip(image_size, padding, flip)
    steps = _crop(image_size, padding) + _flip(flip) + rest
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
    steps = _zoom(policy, strength) + _flip(_flip_probability(policy, strength)) + _affine(policy, strength)
    steps += _color(policy, in_channels, strength)
    return ScenePolicy(v2.Compose(steps) if steps else v2.Identity())


def apply_policy(transform: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, seed: int) -> torch.Tensor:
    """Apply a per-sample `transform` to each of `images` [N, C, H, W]; same seed, same output.

    The global torch RNG is forked, so the caller's random state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(transform, CropFlip):
            return transform.batch(images)
        return torch.stack([transform(image) for image in images]) if len(images) else images.clone()
