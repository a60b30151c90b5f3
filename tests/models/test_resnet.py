"""ResNet: basic/bottleneck layouts, pre-activation, stem for small inputs."""

from __future__ import annotations

import pytest
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from models import build
from models.resnet import PreActBlock, PreActBottleneck


@pytest.mark.parametrize("depth,preact,block", [(18, False, BasicBlock), (26, False, Bottleneck),
                                                (10, True, PreActBlock), (14, True, PreActBottleneck)])
def test_depth_picks_block_and_count(depth: int, preact: bool, block: type) -> None:
    model = build("classify", "resnet", 10, 1, 28, depth=depth, preact=preact, width=8)
    blocks = [m for m in model.modules() if isinstance(m, block)]
    convs_per_block = 2 if block in (BasicBlock, PreActBlock) else 3
    assert len(blocks) * convs_per_block + 2 == depth


def test_stem_fits_the_input_size() -> None:
    small = build("classify", "resnet", 10, 1, 28).features[0][0]
    large = build("classify", "resnet", 10, 3, 224).features[0][0]
    assert small.kernel_size == (3, 3) and small.stride == (1, 1)
    assert large.kernel_size == (7, 7) and large.stride == (2, 2)
    assert isinstance(build("classify", "resnet", 10, 1, 8).features[0][-1], nn.Identity)  # no stem pool at 8 px
