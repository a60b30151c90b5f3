"""Every segment family: logits [N, C + 1, H, W] at the input resolution, gradients, export."""

from __future__ import annotations


import numpy as np
import pytest

from pipelines.export import export_onnx
import torch

from models import build, families

SEGMENT = families("segment")


def test_the_issue_families_are_registered() -> None:
    assert {"unet", "fcn", "deeplabv3"} <= set(SEGMENT)


@pytest.mark.parametrize("name", SEGMENT)
@pytest.mark.parametrize("in_channels,image_size", [(1, 8), (3, 28), (1, 40)])
def test_logits_at_input_resolution_and_finite_grads(name: str, in_channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    model = build("segment", name, 3, in_channels, image_size)
    logits = model(torch.randn(2, in_channels, image_size, image_size))
    assert logits.shape == (2, 4, image_size, image_size)
    target = torch.randint(0, 4, (2, image_size, image_size))
    torch.nn.functional.cross_entropy(logits, target).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", SEGMENT)
def test_parameter_count_and_train_eval_difference(name: str) -> None:
    torch.manual_seed(0)
    model = build("segment", name, 3, 1, 64)
    assert 10_000 <= sum(p.numel() for p in model.parameters()) <= 3_000_000
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        train_out = model.train()(x)
        model.eval()
        assert torch.equal(model(x), model(x))
        assert not torch.allclose(train_out, model(x))  # BN batch statistics vs running ones


def test_unet_options_change_the_decoder() -> None:
    bilinear = build("segment", "unet", 2, 1, 32, upsample="bilinear")
    transpose = build("segment", "unet", 2, 1, 32, upsample="transpose")
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in bilinear.modules())
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in transpose.modules())
    # depth 5 does not fit 8 px inputs: the encoder stops pooling at 2 px
    assert len(build("segment", "unet", 2, 1, 8, depth=5).features) == 3


@pytest.mark.parametrize("name", SEGMENT)
def test_exports_to_onnx_with_onnxruntime_parity(name: str, tmp_path) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build("segment", name, 2, 1, 32).eval()
    x = torch.randn(2, 1, 32, 32)
    # The same export the package stage uses (dynamic batch axis, input "input").
    path = export_onnx(model, {"task": "segment", "image_size": 32, "in_channels": 1}, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x[:1].numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x[:1]).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("encoder,plan", [("resnet", {"image_size": 16}), ("resnet", {}), ("mobilenet_v2", {}),
                                          ("vgg", {}), ("lenet5", {"image_size": 16})])  # LeNet-5: 2 px -> 8 px
@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
@pytest.mark.parametrize("image_size", [37, 40])
def test_unet_on_a_classifier_trunk_skips_each_resolution_and_answers_at_the_input_size(encoder, plan, upsample,
                                                                                    image_size, tmp_path) -> None:
    torch.manual_seed(0)
    model = build("segment", "unet", 3, 1, image_size, encoder=encoder, encoder_hparams=plan, upsample=upsample)
    classifier = build("classify", encoder, 3, 1, plan.get("image_size", image_size))
    # the contracting path is the classifier's trunk, tensor for tensor: what `pretrained: classify` loads
    trunk = {k: v.shape for k, v in classifier.features.state_dict().items()}
    assert {k: v.shape for k, v in model.features.state_dict().items()}.items() <= trunk.items()
    assert len(model.decoder) == len(model.levels) - 1 >= 2
    x = torch.randn(2, 1, image_size, image_size)
    logits = model(x)
    assert logits.shape == (2, 4, image_size, image_size)
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 4, (2, image_size, image_size))).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    without = build("segment", "unet", 3, 1, image_size, encoder=encoder, encoder_hparams=plan, upsample=upsample,
                    skips=False)
    assert sum(p.numel() for p in without.decoder.parameters()) < sum(p.numel() for p in model.decoder.parameters())
