"""params.yaml validation: the repo's file loads, and each kind of mistake gives its one-line message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.errors import ConvForgeError
from pipelines.params import Params, load_params

ROOT = Path(__file__).resolve().parents[2]


def write_params(tmp_path: Path, section: str, key: str, value) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConvForgeError) as exc:
        load_params(path)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_repo_params_load():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.kind in ("fashion-mnist", "mnist", "cifar10", "cifar100", "digits", "imagefolder", "coco", "masks")
    assert 0 < params.augment.val_fraction < 0.5
    assert params.scenes.min_items <= params.scenes.max_items


def test_unknown_key(tmp_path):
    assert error_of(write_params(tmp_path, "augment", "copys", 2)) == "augment.copys: unknown key"


def test_wrong_type(tmp_path):
    assert error_of(write_params(tmp_path, "augment", "copies", "two")) == \
        "augment.copies: expected int >= 0, got 'two'"


def test_out_of_range(tmp_path):
    message = error_of(write_params(tmp_path, "augment", "val_fraction", 0.7))
    assert message.startswith("augment.val_fraction: expected number > 0") and "< 0.5" in message
    assert message.endswith("got 0.7")


def test_bad_dataset_name_lists_the_valid_ones(tmp_path):
    message = error_of(write_params(tmp_path, "data", "dataset", "imagenet"))
    assert message.startswith("data.dataset: expected one of fashion-mnist, mnist, cifar10, cifar100, digits")
    assert "imagefolder:PATH" in message and "coco:PATH" in message and "masks:PATH" in message
    assert message.endswith("got 'imagenet'")


def test_bad_choice(tmp_path):
    message = error_of(write_params(tmp_path, "data", "on_corrupt", "ignore"))
    assert message.startswith("data.on_corrupt: expected one of") and "'skip'" in message and "'fail'" in message


def test_scene_ranges_must_be_ordered(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["scenes"]["min_items"], raw["scenes"]["max_items"] = 4, 2
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert error_of(path) == "scenes: min_items (4) must be <= max_items (2)"


def test_missing_file_and_bad_yaml(tmp_path):
    assert "no such params file" in error_of(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    assert "not valid YAML" in error_of(bad)
