"""models/mobilenet_v2.py: its channel rounding is the TF MobileNet reference's (as torchvision's)."""

from __future__ import annotations

from torchvision.models._utils import _make_divisible  # the reference, in this test only

from models.mobilenet_v2 import round_channels


def test_round_channels_matches_the_reference_rounding() -> None:
    for channels in [0.5, 3, 8, 11.2, 12, 16 * 0.35, 24 * 0.35, 32 * 0.25, 1280, 1280 * 1.4, 99.9, 4.01]:
        assert round_channels(channels) == _make_divisible(channels, 8), channels
        assert round_channels(channels, 4) == _make_divisible(channels, 4), channels
