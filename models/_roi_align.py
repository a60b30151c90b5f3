"""RoIAlign (He et al. 2017, Sec. 3) for the two-stage detectors, as two matrix products when they train on the CPU.

torchvision's CPU RoIAlign walks every sample of every RoI, one after the other, forward and backward: on
64 px scenes its backward took half of Faster R-CNN's training step. Bilinear sampling is separable: with
`aligned=False` and a fixed `sampling_ratio`, the pooled map of a RoI on feature map F is Wy F Wx^T, where
each row of Wy (Wx) holds one output bin's bilinear weights along y (x), averaged over its samples. So
training on the CPU pools with two batched matrix products (values and gradients equal torchvision's to
float rounding; tests/models/test_roi_align.py), where maps are small enough for that to be faster.
Inference, export, GPUs and large maps keep torchvision's op.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, box_area, roi_align

# Largest feature map (H x W) pooled as matrix products: their work grows with the map, the sampling loop's
# does not. bench/roi_align.py, forward + backward of 256 RoIs over 8 images, 32 channels, 2 CPU cores, two
# runs: 2.3-4.2x faster than torchvision's op on 8 x 8 to 32 x 32 maps, 1.1x on 64 x 64, 0.9-1.25x on 96 x 96.
MAX_MAP_PIXELS = 64 * 64


def axis_weights(start: Tensor, length: Tensor, size: int, bins: int, ratio: int) -> Tensor:
    """[K, bins, size]: along one axis, each RoI bin's bilinear weights averaged over its `ratio` samples,
    with torchvision's border rules (samples beyond one pixel outside the map count zero, the rest clamp)."""
    steps = torch.arange(bins * ratio, dtype=start.dtype, device=start.device)
    bin_size = length / bins
    pos = (start[:, None] + torch.div(steps, ratio, rounding_mode="floor")[None] * bin_size[:, None]
           + (steps % ratio + 0.5)[None] * (bin_size / ratio)[:, None])
    inside = ((pos >= -1.0) & (pos <= size)).to(start.dtype) / ratio
    pos = pos.clamp(0.0, size - 1)  # at the last pixel both neighbours are that pixel
    low = pos.floor()
    frac = pos - low
    low = low.long()
    high = (low + 1).clamp(max=size - 1)
    weights = torch.zeros(start.shape[0], bins * ratio, size, dtype=start.dtype, device=start.device)
    weights.scatter_add_(2, low[..., None], ((1 - frac) * inside)[..., None])
    weights.scatter_add_(2, high[..., None], (frac * inside)[..., None])
    return weights.view(-1, bins, ratio, size).sum(2)


def separable_roi_align(features: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                        sampling_ratio: int) -> Tensor:
    """torchvision's `roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned=False)`
    for `sampling_ratio > 0`: rois [K, 5] (image index, x1, y1, x2, y2) -> [K, C, out_h, out_w]."""
    n, c, height, width = features.shape
    out_h, out_w = output_size
    k = rois.shape[0]
    if k == 0:
        return features.new_zeros(0, c, out_h, out_w)
    with torch.no_grad():  # the weights hold no gradient: RoIAlign passes none to the boxes
        rois = rois.to(features.dtype)
        image = rois[:, 0].long()
        x1, y1 = rois[:, 1] * spatial_scale, rois[:, 2] * spatial_scale
        wy = axis_weights(y1, (rois[:, 4] * spatial_scale - y1).clamp(min=1.0), height, out_h, sampling_ratio)
        wx = axis_weights(x1, (rois[:, 3] * spatial_scale - x1).clamp(min=1.0), width, out_w, sampling_ratio)
        # Each image's RoIs side by side (padded to the most any image has): one batched product per axis.
        # `slot`: a RoI's place among its image's RoIs.
        counts = torch.bincount(image, minlength=n)
        per_image = int(counts.max())
        order = torch.argsort(image, stable=True)
        first = torch.cumsum(counts, 0) - counts  # each image's first place in `order`
        slot = torch.empty_like(order)
        slot[order] = torch.arange(k, device=rois.device) - first.repeat_interleave(counts)
        rows = features.new_zeros(n, per_image, out_h, height)
        rows[image, slot] = wy
        cols = features.new_zeros(n, per_image, out_w, width)
        cols[image, slot] = wx
    pooled = torch.matmul(rows.view(n, 1, per_image * out_h, height), features.contiguous())
    pooled = torch.matmul(pooled.view(n, c, per_image, out_h, width), cols.transpose(-1, -2)[:, None])
    return pooled.permute(0, 2, 1, 3, 4)[image, slot]  # [K, C, out_h, out_w]


class SeparableRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (FPN level per RoI, Lin et al. 2017, Eq. 1) that pools with
    `separable_roi_align` while it trains on the CPU, level by level where the map is small enough."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        maps = [v for name, v in x.items() if name in self.featmap_names]
        if not (self.training and torch.is_grad_enabled() and self.sampling_ratio > 0 and maps[0].device.type == "cpu"
                and not torch.jit.is_tracing()):
            return super().forward(x, boxes, image_shapes)
        original = [max(shape[i] for shape in image_shapes) for i in (0, 1)]
        scales = [2.0 ** float(torch.tensor(m.shape[-2] / original[0]).log2().round()) for m in maps]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        if len(maps) == 1:
            return self._pool(maps[0], rois, scales[0])
        first, last = int(-math.log2(scales[0])), int(-math.log2(scales[-1]))
        size = torch.sqrt(torch.cat([box_area(b) for b in boxes]))
        levels = torch.floor(self.canonical_level + torch.log2(size / self.canonical_scale)
                             + torch.tensor(1e-6, dtype=size.dtype)).clamp(first, last).long() - first
        result = maps[0].new_zeros((len(rois), maps[0].shape[1], *self.output_size))
        for level, (features, scale) in enumerate(zip(maps, scales)):
            chosen = torch.where(levels == level)[0]
            result[chosen] = self._pool(features, rois[chosen], scale).to(result.dtype)
        return result

    def _pool(self, features: Tensor, rois: Tensor, scale: float) -> Tensor:
        if features.shape[-2] * features.shape[-1] > MAX_MAP_PIXELS:
            return roi_align(features, rois, self.output_size, scale, self.sampling_ratio)
        return separable_roi_align(features, rois, self.output_size, scale, self.sampling_ratio)
