"""Every classify family (parametrized over the registry, so a new family is tested by adding it)."""

from __future__ import annotations


import numpy as np
import pytest

from pipelines.export import export_onnx
import torch
from torch import nn

from models import AuxLogits, build, families, family

CLASSIFY = families("classify")
# Hyperparameters that make each family clearly bigger than its CPU default (the GPU end of its scale).
SCALE_UP = {
    "alexnet": {"width": 1.0}, "convnext": {"width": 96, "depth": 3}, "densenet": {"layers": 16, "growth_rate": 32},
    "efficientnet": {"phi": 0}, "googlenet": {"width": 1.0}, "highway": {"width": 64, "layers": 9},
    "lenet5": {"width": 4}, "mobilenet_v2": {"width_mult": 1.0, "depth_mult": 1.0},
    "resnet": {"depth": 50, "width": 64},
    "squeezenet": {"width": 2.0}, "vgg": {"depth": 19, "width": 64}, "xception": {"width": 64, "middle_blocks": 8},
}


def logits_of(out: torch.Tensor | AuxLogits) -> torch.Tensor:
    return out.logits if isinstance(out, AuxLogits) else out


def test_the_issue_families_are_registered() -> None:
    assert set(CLASSIFY) >= set(SCALE_UP)


@pytest.mark.parametrize("name", CLASSIFY)
@pytest.mark.parametrize("in_channels,image_size", [(1, 8), (1, 28), (3, 20)])
def test_forward_backward_shapes(name: str, in_channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    model = build("classify", name, 7, in_channels, image_size)
    out = model(torch.randn(2, in_channels, image_size, image_size))
    logits = logits_of(out)
    assert logits.shape == (2, 7)
    loss = logits.logsumexp(1).mean() + sum(a.logsumexp(1).mean() for a in getattr(out, "aux", []))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, in_channels, image_size, image_size)).shape == (1, 7)


@pytest.mark.parametrize("name", CLASSIFY)
def test_parameter_count_spans_cpu_to_gpu_scale(name: str) -> None:
    default = sum(p.numel() for p in build("classify", name, 10, 1, 28).parameters())
    assert 10_000 <= default <= 3_000_000, default
    assert name in SCALE_UP, f"add a scale-up entry for {name} to SCALE_UP"
    large = sum(p.numel() for p in build("classify", name, 10, 3, 28, **SCALE_UP[name]).parameters())
    assert large >= 2 * default, (default, large)


@pytest.mark.parametrize("name", CLASSIFY)
def test_defaults_lie_in_the_space_and_dropout_is_tunable(name: str) -> None:
    fam = family("classify", name)
    assert "dropout" in fam.space
    for key, domain in fam.space.items():
        value = fam.defaults[key]
        if hasattr(domain, "values"):
            assert value in list(domain.values), key
        else:
            assert domain.low <= value <= domain.high, key


@pytest.mark.parametrize("name", CLASSIFY)
def test_train_and_eval_modes_differ_and_eval_is_deterministic(name: str) -> None:
    torch.manual_seed(0)
    model = build("classify", name, 5, 1, 16, dropout=0.3)
    assert any(isinstance(m, (nn.Dropout, nn.BatchNorm2d)) and (not isinstance(m, nn.Dropout) or m.p > 0)
               for m in model.modules())
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        train_out = logits_of(model.train()(x))
        model.eval()
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    assert not torch.allclose(train_out, first)


@pytest.mark.parametrize("name", CLASSIFY)
def test_exports_to_onnx_with_onnxruntime_parity(name: str, tmp_path) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build("classify", name, 4, 1, 16).eval()
    x = torch.randn(2, 1, 16, 16)
    # The same export the package stage uses (dynamic batch axis, input "input").
    path = export_onnx(model, {"task": "classify", "image_size": 16, "in_channels": 1}, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 1, 16, 16)  # another batch size than traced
    (got,) = session.run(None, {"input": x3.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x3).numpy(), rtol=1e-4, atol=1e-4)
