"""GoogLeNet: auxiliary classifiers after 4a and 4d, in train mode only."""

from __future__ import annotations

import torch

from models import AuxLogits, build


def test_aux_logits_in_train_mode_only() -> None:
    model = build("classify", "googlenet", 5, 1, 28)
    x = torch.randn(2, 1, 28, 28)
    out = model.train()(x)
    assert isinstance(out, AuxLogits) and out.logits.shape == (2, 5)
    assert [a.shape for a in out.aux] == [(2, 5), (2, 5)]
    assert isinstance(model.eval()(x), torch.Tensor)
    plain = build("classify", "googlenet", 5, 1, 28, aux_logits=False).train()
    assert isinstance(plain(x), torch.Tensor)
