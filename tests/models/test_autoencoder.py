"""models/autoencoder.py and models/unet.py as reconstruct families;
an encoder initialises a classifier whole or not at all."""

from __future__ import annotations

import pytest
import torch

from models import build
from models._checkpoint import CheckpointError, save


@pytest.mark.parametrize("encoder", ["lenet5", "resnet", "vgg", "mobilenet_v2"])
def test_autoencoder_restores_at_the_input_size_with_a_classifier_trunk(encoder) -> None:
    model = build("reconstruct", "autoencoder", 10, 1, 28, encoder=encoder).eval()
    classifier = build("classify", encoder, 10, 1, 28)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 1, 28, 28)
    assert set(classifier.features.state_dict()) == set(model.features.state_dict())


def test_unet_skips_are_a_choice_and_segment_keeps_its_shape() -> None:
    with_skips = build("reconstruct", "unet", 10, 3, 24, skips=True)
    without = build("reconstruct", "unet", 10, 3, 24, skips=False)
    assert with_skips(torch.zeros(2, 3, 24, 24)).shape == without(torch.zeros(2, 3, 24, 24)).shape == (2, 3, 24, 24)
    assert sum(p.numel() for p in without.parameters()) < sum(p.numel() for p in with_skips.parameters())
    segmenter = build("segment", "unet", 4, 1, 32)
    assert segmenter(torch.zeros(1, 1, 32, 32)).shape == (1, 5, 32, 32)
    assert segmenter.decoder[0].conv[0].in_channels == 2 * segmenter.decoder[0].conv[0].out_channels  # skips on


def saved(model, family: str, hparams: dict, folder) -> str:
    save(model, {"task": "reconstruct", "family": family, "num_classes": 10, "in_channels": 1, "image_size": 28,
                 "hparams": hparams}, folder)
    return str(folder)


def test_a_classifier_takes_the_whole_encoder_and_says_how_many_tensors_matched(tmp_path) -> None:
    encoder = build("reconstruct", "autoencoder", 10, 1, 28, encoder="resnet")
    folder = saved(encoder, "autoencoder", {"encoder": "resnet"}, tmp_path / "ae")
    lines: list[str] = []
    from models._checkpoint import apply_transfer

    classifier = build("classify", "resnet", 10, 1, 28)
    report = apply_transfer(classifier, pretrained=folder, log=lines.append)
    assert report["trunk_matched"] == report["trunk"] == len(classifier.features.state_dict())
    assert f"{report['trunk']}/{report['trunk']} of the trunk" in lines[0]
    assert torch.equal(classifier.features[0][0].weight, encoder.features[0][0].weight)


def test_an_encoder_that_fits_only_part_of_the_trunk_is_a_one_line_error(tmp_path) -> None:
    encoder = saved(build("reconstruct", "autoencoder", 10, 1, 28, encoder="resnet"), "autoencoder",
                    {"encoder": "resnet"}, tmp_path / "ae")
    with pytest.raises(CheckpointError, match=r"only \d+/\d+ trunk tensors match the encoder .* encoder is resnet"):
        build("classify", "resnet", 10, 1, 28, width=32, pretrained=encoder)
    unet = saved(build("reconstruct", "unet", 10, 1, 28), "unet", {}, tmp_path / "unet")
    with pytest.raises(CheckpointError, match="unet \\(not a classifier's trunk\\)") as caught:
        build("classify", "lenet5", 10, 1, 28, pretrained=unet)
    assert "\n" not in str(caught.value)
