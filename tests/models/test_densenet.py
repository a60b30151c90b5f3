"""models/densenet.py: its dense layers, blocks and transitions match torchvision's (keys, shapes, numerics)."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.densenet import _DenseBlock, _Transition  # the reference, in this test only

from models.densenet import DenseBlock, Transition


def _same_state(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    mine, theirs = ours.state_dict(), reference.state_dict()
    assert list(mine) == list(theirs)
    for key in mine:
        assert mine[key].shape == theirs[key].shape, key
        torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0)


@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
def test_dense_block_is_torchvisions_with_the_same_seed(drop_rate: float) -> None:
    torch.manual_seed(0)
    reference = _DenseBlock(3, 8, bn_size=4, growth_rate=6, drop_rate=drop_rate)
    torch.manual_seed(0)
    ours = DenseBlock(3, 8, bn_size=4, growth_rate=6, drop_rate=drop_rate)
    _same_state(ours, reference)
    x = torch.randn(2, 8, 10, 10)
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(reference, mode)()
        torch.manual_seed(1)
        expected = reference(x)
        torch.manual_seed(1)
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=0)


def test_transition_is_torchvisions_with_the_same_seed() -> None:
    torch.manual_seed(0)
    reference = _Transition(12, 6)
    torch.manual_seed(0)
    ours = Transition(12, 6)
    _same_state(ours, reference)
    x = torch.randn(2, 12, 8, 8)
    torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)
