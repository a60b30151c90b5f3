"""models._registry: families per task, hparam checking, transfer hparams for every family."""

from __future__ import annotations

import pytest
import torch

from models import Choice, build, families, family, register
from models._registry import TASKS, TRANSFER_KEYS


def test_every_task_has_families_and_every_family_a_space_and_paper() -> None:
    for task in TASKS:
        assert families(task)
        for name in families(task):
            fam = family(task, name)
            assert fam.space and fam.paper
            assert set(fam.space) <= set(fam.defaults), f"{task}/{name}: every tunable key needs a default"


def test_unknown_names_and_hparams_are_rejected_with_the_valid_ones() -> None:
    with pytest.raises(KeyError, match="known: .*lenet5"):
        family("classify", "lenet6")
    with pytest.raises(KeyError, match="no hyperparameter.*'widht'.*known.*pretrained"):
        build("classify", "lenet5", 10, 1, 28, widht=2)
    with pytest.raises(KeyError, match="unknown task"):
        families("regress")


def test_a_family_registers_once() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register("classify", "lenet5", space={"x": Choice([1])})(lambda **kw: torch.nn.Identity())


@pytest.mark.parametrize("task", TASKS)
def test_transfer_hparams_are_accepted_by_every_family(task: str) -> None:
    assert TRANSFER_KEYS == ("pretrained", "freeze", "freeze_bn")
    size = 16 if task == "classify" else 40
    for name in families(task):
        model = build(task, name, 2, 1, size, pretrained=None, freeze=1, freeze_bn=False)
        assert model.transfer_report["frozen_stages"] == 1
