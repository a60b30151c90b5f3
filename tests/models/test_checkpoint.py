"""models._checkpoint: safetensors + JSON round trips for every family, hash checks, transfer learning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from models import build, families
from models._checkpoint import CheckpointError, apply_transfer, load, save, train_mode, trunk_parameters
from pipelines.errors import ConvForgeError

SIZES = {"classify": (1, 16), "segment": (1, 32), "detect": (1, 40)}
ALL = [(task, name) for task in ("classify", "segment", "detect") for name in families(task)]


def config_for(task: str, name: str, **hparams) -> dict:
    in_channels, image_size = SIZES[task]
    return {"task": task, "family": name, "num_classes": 3, "in_channels": in_channels, "image_size": image_size,
            "hparams": hparams, "classes": ["a", "b", "c"]}


def run(model: torch.nn.Module, task: str) -> torch.Tensor:
    in_channels, image_size = SIZES[task]
    x = torch.randn(2, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if task == "detect":
            return torch.cat([torch.cat([d["boxes"].flatten(), d["scores"]]) for d in model(list(x))])
        return model(x)


@pytest.mark.parametrize("task,name", ALL)
def test_round_trip_rebuilds_the_same_model(task: str, name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = config_for(task, name)
    model = build(task, name, 3, *SIZES[task]).eval()
    sha = save(model, config, tmp_path / "m")
    assert config["weights_sha256"] == sha
    assert json.loads((tmp_path / "m/config.json").read_text())["weights_sha256"] == sha
    loaded, loaded_config = load(tmp_path / "m", expected_sha256=sha)
    assert not loaded.training and loaded_config["classes"] == ["a", "b", "c"]
    assert torch.equal(run(model, task), run(loaded, task))
    # the file is plain safetensors: tensors only, nothing to unpickle
    assert set(load_file(tmp_path / "m/model.safetensors")) == set(model.state_dict())


def test_round_trip_with_non_default_hparams(tmp_path: Path) -> None:
    model = build("classify", "resnet", 3, 1, 16, depth=14, width=8, preact=True)
    sha = save(model, config_for("classify", "resnet", depth=14, width=8, preact=True), tmp_path)
    loaded, _ = load(tmp_path, expected_sha256=sha)
    assert torch.equal(loaded.head[3].weight, model.head[3].weight)


def test_the_same_weights_save_to_the_same_bytes(tmp_path: Path) -> None:
    """weights_sha256 (and DVC's hash of the model folder) depends on the weights alone: safetensors orders its
    metadata as a hash map does, differently from one save to the next, so it holds one entry only."""
    model = build("classify", "resnet", 3, 1, 16)
    hashes = {save(model, config_for("classify", "resnet"), tmp_path / str(n)) for n in range(24)}
    assert len(hashes) == 1
    assert len({(tmp_path / str(n) / "model.safetensors").read_bytes() for n in range(24)}) == 1


def test_shared_tensors_are_saved_under_each_name(tmp_path: Path) -> None:
    model = build("classify", "lenet5", 3, 1, 16)
    model.extra = model.head[-1]  # one Linear under two names: aliased tensors, which safetensors refuses
    save(model, config_for("classify", "lenet5"), tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert torch.equal(saved["extra.weight"], saved["head.5.weight"])


def test_tampered_weights_and_wrong_hashes_fail(tmp_path: Path) -> None:
    model = build("classify", "lenet5", 3, 1, 16)
    sha = save(model, config_for("classify", "lenet5"), tmp_path)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load(tmp_path, expected_sha256="0" * 64)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="config.json says"):
        load(tmp_path)
    assert issubclass(CheckpointError, ConvForgeError) and sha


def test_missing_or_mismatched_checkpoints_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load(tmp_path)
    save(build("classify", "lenet5", 3, 1, 16), config_for("classify", "lenet5"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hparams"] = {"width": 2}  # weights of width 1, config says width 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not fit"):
        load(tmp_path)
    with pytest.raises(ValueError, match="lacks"):
        save(build("classify", "lenet5", 3, 1, 16), {"task": "classify"}, tmp_path / "x")


def test_classifier_trunk_transfers_to_a_detector_and_a_segmenter(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = {"depth": 10, "width": 8}
    classifier = build("classify", "resnet", 10, 1, 64, **backbone)
    save(classifier, {**config_for("classify", "resnet", **backbone), "image_size": 64}, tmp_path / "cls")
    stem = classifier.features[0][0].weight

    detector = build("detect", "fcos", 3, 1, 64, backbone_hparams=backbone, pretrained=str(tmp_path / "cls"),
                     freeze=2, freeze_bn=True)
    report = detector.transfer_report
    assert report["matched"] > 20 and report["wrong_shape"] == 0
    assert torch.equal(detector.backbone.features[0][0].weight, stem)
    assert not any(p.requires_grad for p in detector.backbone.features[:2].parameters())
    assert all(p.requires_grad for p in detector.backbone.features[2].parameters())
    assert report["frozen_bn"] > 0 and not any(isinstance(m, torch.nn.BatchNorm2d)
                                               for m in detector.backbone.features.modules())
    # the detector saves and loads without its pretrained source
    config = config_for("detect", "fcos", backbone_hparams=backbone, pretrained=str(tmp_path / "cls"), freeze=2,
                        freeze_bn=True)
    config["image_size"] = 64
    save(detector, config, tmp_path / "det")
    (tmp_path / "cls/model.safetensors").unlink()
    loaded, _ = load(tmp_path / "det")
    assert torch.equal(loaded.backbone.features[0][0].weight, stem)

    segmenter = build("segment", "fcn", 3, 1, 64, backbone_hparams=backbone)
    with pytest.raises(CheckpointError, match="no weights"):
        apply_transfer(segmenter, pretrained=str(tmp_path / "cls"), log=lambda _: None)


def test_transfer_refuses_unrelated_weights_and_bad_freeze(tmp_path: Path) -> None:
    save(build("classify", "lenet5", 3, 1, 16), config_for("classify", "lenet5"), tmp_path)
    target = build("classify", "vgg", 3, 1, 16)
    with pytest.raises(ConvForgeError, match="no tensor"):
        apply_transfer(target, pretrained=str(tmp_path), log=lambda _: None)
    with pytest.raises(ConvForgeError, match="freeze"):
        apply_transfer(target, freeze=99)


def test_torchvision_weights_come_only_from_the_local_cache(tmp_path: Path) -> None:
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        with pytest.raises(ConvForgeError, match="not in the local torch cache"):
            build("classify", "resnet", 10, 3, 224, depth=18, width=64,
                  pretrained="torchvision:ResNet18_Weights.IMAGENET1K_V1")
        with pytest.raises(ConvForgeError, match="unknown torchvision weights"):
            build("classify", "resnet", 10, 3, 224, pretrained="torchvision:NoSuch_Weights.X")
        # a torchvision ResNet-18 state_dict in the cache, under the file name torchvision would use
        reference = torchvision.models.resnet18()
        (tmp_path / "checkpoints").mkdir()
        torch.save(reference.state_dict(), tmp_path / "checkpoints/resnet18-f37072fd.pth")
        model = build("classify", "resnet", 10, 3, 224, depth=18, width=64,
                      pretrained="torchvision:ResNet18_Weights.IMAGENET1K_V1")
    finally:
        torch.hub.set_dir(previous)
    report = model.transfer_report
    assert report["matched"] == report["source"] - 2  # everything but the 1000-class fc
    assert torch.equal(model.features[4][1].conv2.weight, reference.layer4[1].conv2.weight)
    assert torch.equal(model.features[0][1].running_var, reference.bn1.running_var)


def test_train_mode_keeps_the_batchnorm_of_frozen_stages_in_inference_mode() -> None:
    """Keras `trainable=False`: a frozen stage's BN normalizes with, and keeps, its running statistics."""
    model = build("classify", "resnet", 3, 1, 16, depth=10, width=8, freeze=1)  # the stem, frozen as a hparam
    norms = [[m for m in stage.modules() if isinstance(m, torch.nn.BatchNorm2d)] for stage in model.features]
    assert norms[0] and norms[1]
    train_mode(model)
    assert model.training and not any(m.training for m in norms[0]) and all(m.training for m in norms[1])
    before = norms[0][0].running_mean.clone(), norms[0][0].num_batches_tracked.clone()
    model(torch.randn(4, 1, 16, 16))
    assert torch.equal(norms[0][0].running_mean, before[0]) and torch.equal(norms[0][0].num_batches_tracked, before[1])
    for parameter in model.features[0].parameters():  # released: trains and updates its statistics again
        parameter.requires_grad_(True)
    assert all(m.training for m in train_mode(model).modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_trunk_parameters_are_the_trainable_ones_of_the_first_stages() -> None:
    model = build("classify", "resnet", 3, 1, 16, depth=10, width=8, freeze=1)
    held = trunk_parameters(model, 2)
    assert {id(p) for p in held} == {id(p) for p in model.features[1].parameters()}  # the stem was frozen already
    assert trunk_parameters(model, 0) == []
    with pytest.raises(ConvForgeError, match=r"freeze: expected 0\.\.\d+ stages, got 99"):
        trunk_parameters(model, 99)
