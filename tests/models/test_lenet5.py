"""LeNet-5: the published variant (tanh, average pooling, sparse C3) and the modern one."""

from __future__ import annotations

import torch
from torch import nn

from models import build
from models.lenet5 import C3_TABLE, SparseConv2d


def test_classic_variant_uses_tanh_and_average_pooling_with_the_c3_table() -> None:
    model = build("classify", "lenet5", 10, 1, 28, variant="classic", sparse_c3=True)
    kinds = {type(m) for m in model.modules()}
    assert nn.Tanh in kinds and nn.AvgPool2d in kinds and nn.ReLU not in kinds and nn.MaxPool2d not in kinds
    conv = next(m for m in model.modules() if isinstance(m, SparseConv2d))
    # 60 of the 96 S2->C3 connections exist (LeCun et al. 1998, Sec. II.B)
    assert conv.mask.sum() == 60 == sum(len(c) for c in C3_TABLE)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    assert (conv.weight.grad[conv.mask.expand_as(conv.weight) == 0] == 0).all()


def test_modern_variant_and_the_published_28px_geometry() -> None:
    model = build("classify", "lenet5", 10, 1, 28)
    assert any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.features(torch.zeros(1, 1, 28, 28)).shape == (1, 120, 1, 1)  # C5 is 120 maps of 1x1
