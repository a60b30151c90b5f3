"""Highway layers: y = T*H(x) + (1 - T)*x."""

from __future__ import annotations

import torch

from models.highway import HighwayConv


def test_closed_gate_carries_the_input_and_open_gate_transforms_it() -> None:
    x = torch.randn(2, 4, 6, 6)
    closed = HighwayConv(4, gate_bias=-50.0).eval()
    torch.nn.init.zeros_(closed.gate.weight)
    assert torch.allclose(closed(x), x)
    opened = HighwayConv(4, gate_bias=50.0).eval()
    torch.nn.init.zeros_(opened.gate.weight)
    assert torch.allclose(opened(x), opened.transform(x))
