"""models._registry: families per task, hparam checking, transfer hparams for every family."""

from __future__ import annotations

import pytest
import torch

import inspect

from models import Choice, build, families, family, register, tasks
from models import _registry
from models._registry import TRANSFER_KEYS

TASKS = ("classify", "detect", "segment", "regress", "reconstruct")


def test_the_tasks_are_those_families_register_for() -> None:
    assert tasks() == sorted(TASKS)


def test_every_task_has_families_and_every_family_a_space_and_paper() -> None:
    for task in tasks():
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
    with pytest.raises(KeyError, match="unknown task 'depth'; tasks are classify, detect, "):
        families("depth")


def test_defaults_are_read_from_the_builders_signature() -> None:
    fam = family("classify", "resnet")
    signature = inspect.signature(fam.builder).parameters
    assert fam.defaults == {name: signature[name].default for name in ("depth", "width", "preact", "dropout")}
    assert family("segment", "fcn").defaults["backbone_hparams"] == {}
    family("segment", "fcn").defaults["backbone_hparams"]["depth"] = 14  # a copy: the next read is clean
    assert family("segment", "fcn").defaults["backbone_hparams"] == {}


def test_a_new_task_exists_once_a_family_registers_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry, "_REGISTRY", {task: dict(fams) for task, fams in _registry._REGISTRY.items()})

    @register("depth", "linear", space={"width": Choice([1, 2])}, paper="-")
    def linear(num_classes: int, in_channels: int, image_size: int, width: int = 1) -> torch.nn.Module:
        return torch.nn.Linear(in_channels * width, num_classes)

    assert "depth" in tasks() and families("depth") == ["linear"]
    assert build("depth", "linear", 3, 4, 8).out_features == 3
    assert family("depth", "linear").defaults == {"width": 1}


def test_a_searched_hparam_needs_a_signature_default() -> None:
    with pytest.raises(TypeError, match=r"'depth'.*default"):
        register("classify", "nodefault", space={"depth": Choice([1])})(
            lambda num_classes, in_channels, image_size, depth: torch.nn.Identity())
    with pytest.raises(TypeError, match="must take num_classes, in_channels, image_size first"):
        register("classify", "badinputs")(lambda classes, channels, size: torch.nn.Identity())


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
