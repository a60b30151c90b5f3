"""models._stages: the stride plan for small inputs and the backbone helpers."""

from __future__ import annotations

import pytest

from models import build
from models._stages import stage_shapes, stride_plan


@pytest.mark.parametrize("size,points,plan", [(8, 5, [1, 1, 1, 2, 2]), (28, 5, [1, 2, 2, 2, 2]),
                                              (64, 5, [2, 2, 2, 2, 2]), (224, 3, [2, 2, 2]), (3, 2, [1, 2]),
                                              (2, 2, [1, 1])])
def test_stride_plan_keeps_at_least_two_pixels(size: int, points: int, plan: list[int]) -> None:
    assert stride_plan(size, points) == plan


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2", "efficientnet", "convnext", "vgg", "xception"])
def test_backbones_reach_strides_4_8_16_on_scene_canvases(name: str) -> None:
    model = build("classify", name, 2, 1, 64)
    strides = [stride for _, stride in stage_shapes(model.features, 1, 64)]
    assert strides == sorted(strides) and {4, 8, 16} <= set(strides)
