"""The separable RoIAlign equals torchvision's, values and gradients, alone and inside the pyramid pooler."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from models import build
from models._roi_align import MAX_MAP_PIXELS, SeparableRoIAlign, separable_roi_align


def random_boxes(generator: torch.Generator, count: int, image_size: int) -> torch.Tensor:
    """xyxy boxes inside the image, from sub-pixel slivers to the whole image (some touch its borders)."""
    xy = torch.rand(count, 2, generator=generator) * image_size
    wh = torch.rand(count, 2, generator=generator) ** 2 * image_size
    boxes = torch.cat([xy, (xy + wh).clamp(max=image_size)], 1)
    boxes[:3] = torch.tensor([[0.0, 0.0, image_size, image_size], [0.0, 0.0, 0.3, 0.2],
                              [image_size - 1.5, 2.0, image_size, 2.4]])
    return boxes


def same_with_grads(ours, theirs, features: torch.Tensor) -> None:
    """`ours(features)` and `theirs(features)` agree in value and in the gradient they pass to `features`."""
    grad_out = None
    results = []
    for pool in (ours, theirs):
        x = features.clone().requires_grad_(True)
        out = pool(x)
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        out.backward(grad_out)
        results.append((out.detach(), x.grad))
    (out, grad), (expected, expected_grad) = results
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampling_ratio, output_size, map_size", [(2, (7, 7), 16), (1, (14, 14), 9), (3, (7, 5), 12)])
def test_equals_torchvision_roi_align(sampling_ratio: int, output_size: tuple[int, int], map_size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    images, image_size = 3, map_size * 4
    features = torch.randn(images, 5, map_size, map_size + 3, generator=generator)
    boxes = random_boxes(generator, 40, image_size)
    index = torch.tensor([0] * 25 + [2] * 15, dtype=torch.float32)  # image 1 has no RoI
    rois = torch.cat([index[:, None], boxes], 1)
    same_with_grads(lambda x: separable_roi_align(x, rois, output_size, 0.25, sampling_ratio),
                    lambda x: roi_align(x, rois, output_size, 0.25, sampling_ratio, aligned=False), features)


def test_no_rois_pool_to_an_empty_batch() -> None:
    out = separable_roi_align(torch.randn(2, 4, 8, 8), torch.zeros(0, 5), (7, 7), 0.5, 2)
    assert out.shape == (0, 4, 7, 7)


def pyramid(generator: torch.Generator, image_size: int, channels: int = 6) -> OrderedDict[str, torch.Tensor]:
    """Maps at strides 2, 4 and 8 (the finest larger than MAX_MAP_PIXELS when the image is) and one unpooled."""
    return OrderedDict((name, torch.randn(2, channels, image_size // s, image_size // s, generator=generator))
                       for name, s in (("0", 2), ("1", 4), ("2", 8), ("pool", 16)))


@pytest.mark.parametrize("image_size", [64, 144])
def test_pyramid_pooler_equals_torchvision_while_training(image_size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    maps = pyramid(generator, image_size)
    if image_size == 144:  # its stride-2 map keeps torchvision's op
        assert maps["0"][0, 0].numel() > MAX_MAP_PIXELS
    boxes = [random_boxes(generator, 30, image_size), random_boxes(generator, 12, image_size)]
    shapes = [(image_size, image_size)] * 2
    # FPN's level mapping scaled to these images (Eq. 1 with 224 px boxes at level 4 sends them all to level 0)
    mapping = {"canonical_scale": image_size // 4, "canonical_level": 2}
    ours = SeparableRoIAlign(["0", "1", "2"], 7, 2, **mapping).train()
    theirs = MultiScaleRoIAlign(["0", "1", "2"], 7, 2, **mapping).train()
    for name in ("0", "1", "2"):  # each level must pool some RoIs, or a mapping slip would go unseen
        level_maps = OrderedDict((k, v if k == name else v * 0) for k, v in maps.items())
        assert ours(level_maps, boxes, shapes).abs().sum() > 0

    def run(pool):
        def pooled(finest: torch.Tensor) -> torch.Tensor:
            return pool(OrderedDict(maps, **{"0": finest}), boxes, shapes)
        return pooled

    same_with_grads(run(ours), run(theirs), maps["0"])


def test_inference_is_torchvision_op_itself() -> None:
    generator = torch.Generator().manual_seed(0)
    maps = pyramid(generator, 64)
    boxes = [random_boxes(generator, 10, 64), random_boxes(generator, 4, 64)]
    ours = SeparableRoIAlign(["0", "1", "2"], 7, 2).eval()
    theirs = MultiScaleRoIAlign(["0", "1", "2"], 7, 2).eval()
    assert torch.equal(ours(maps, boxes, [(64, 64)] * 2), theirs(maps, boxes, [(64, 64)] * 2))


@pytest.mark.parametrize("family", ["faster_rcnn", "mask_rcnn"])
def test_two_stage_detectors_pool_with_it(family: str) -> None:
    model = build("detect", family, 3, 1, 64)
    pools = [m for m in model.modules() if isinstance(m, MultiScaleRoIAlign)]
    assert pools and all(isinstance(m, SeparableRoIAlign) for m in pools)
