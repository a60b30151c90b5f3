"""The regress task (pipelines/regression.py): rotated items, the regressor wrapper, the loss and the meter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from models import _checkpoint as checkpoint
from models._registry import BACKBONE_TASK, REGRESS_TASK, build, families, family
from pipelines.export import export_checked
from pipelines.geometry import geometry_hparams
from pipelines.regression import MAX_ANGLE, SCATTER, RegressMeter, item_angles, load_rotated, rotate
from pipelines.tasks import TASKS, get_task

TASK = get_task(REGRESS_TASK)


def test_the_task_is_declared_with_every_classifier_family():
    assert REGRESS_TASK in TASKS
    assert families(REGRESS_TASK) == families(BACKBONE_TASK)


def test_rotate_matches_torchvision_per_image():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8, generator=generator)
    angles = torch.tensor([-40.0, 7.5, 33.0])
    rotated = rotate(images, angles)
    for image, angle, got in zip(images, angles, rotated):
        expected = TF.rotate(image, float(angle), interpolation=TF.InterpolationMode.BILINEAR)
        assert (got.int() - expected.int()).abs().max() <= 1  # rounding of the bilinear sums only


def test_angles_are_fixed_per_split_and_in_range():
    a, b = item_angles(42, "test", 500), item_angles(42, "test", 500)
    assert np.array_equal(a, b)
    assert np.abs(a).max() <= MAX_ANGLE and a.min() < -MAX_ANGLE / 2 and a.max() > MAX_ANGLE / 2
    assert not np.array_equal(a[:100], item_angles(42, "val", 100))
    assert np.array_equal(item_angles(42, "test", 100), a[:100])  # an item's angle does not depend on the count


def test_load_rotated_gives_the_items_rotated_by_their_targets(prepared_classify):
    from pipelines.datasets import load_classify

    items, data = load_classify(prepared_classify, "val"), load_rotated(prepared_classify, "val")
    assert data.classes == ["angle"] and data.values.shape == (len(items), 1)
    assert torch.equal(data.values, load_rotated(prepared_classify, "val").values)  # same every load
    i = 3
    expected = TF.rotate(items.images[i], float(data.values[i, 0]), interpolation=TF.InterpolationMode.BILINEAR)
    assert (data.images[i].int() - expected.int()).abs().max() <= 1
    stats = data.target_stats()
    assert stats["target_mean"] == [pytest.approx(float(data.values.mean()), abs=1e-5)]
    assert geometry_hparams(family(REGRESS_TASK, "lenet5").defaults, data) == stats


def test_regressor_answers_in_target_units_and_saves_its_standardisation(tmp_path):
    torch.manual_seed(0)
    model = build(REGRESS_TASK, "lenet5", 2, 1, 16, target_mean=[10.0, -3.0], target_std=[20.0, 0.5]).eval()
    images = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(images), model.standardized(images) * torch.tensor([20.0, 0.5])
                              + torch.tensor([10.0, -3.0]))
    hparams = {**family(REGRESS_TASK, "lenet5").defaults, "target_mean": [10.0, -3.0], "target_std": [20.0, 0.5]}
    checkpoint.save(model, {"task": REGRESS_TASK, "family": "lenet5", "hparams": hparams, "num_classes": 2,
                            "in_channels": 1, "image_size": 16, "classes": ["a", "b"]}, tmp_path)
    loaded, _ = checkpoint.load(tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(images), model(images))


def test_regressor_exports_to_onnx(tmp_path):
    torch.manual_seed(0)
    model = build(REGRESS_TASK, "resnet", 1, 1, 16, depth=10, width=8, target_mean=[1.0], target_std=[25.0]).eval()
    report = export_checked(model, {"task": REGRESS_TASK, "family": "resnet", "image_size": 16, "in_channels": 1},
                            tmp_path / "model.onnx")
    assert report["max_abs_diff"] <= report["tolerance"]


@pytest.mark.parametrize("loss", ["mse", "smooth_l1"])
def test_loss_is_on_the_standardized_error(project_params, loss):
    model = build(REGRESS_TASK, "lenet5", 1, 1, 16, target_mean=[0.0], target_std=[10.0])
    cfg = project_params.train.task(REGRESS_TASK).updated(loss=loss)
    images = torch.randn(8, 1, 16, 16)
    targets = torch.linspace(-40, 40, 8)[:, None]
    error = (model(images) - targets) / 10.0
    expected = error.square().mean() if loss == "mse" else torch.nn.functional.smooth_l1_loss(error, 0 * error)
    assert torch.allclose(TASK.loss(model, images, targets, cfg), expected)


def test_augmentation_keeps_the_angle(project_params):
    """Flips and rotations are dropped from the policy (they change the target); crops stay."""
    policy = project_params.augment.policy.model_copy(update={"hflip": 1.0, "rotation_deg": 30.0,
                                                              "crop_padding": 0, "erasing": 0.0})
    image = torch.zeros(1, 16, 16, dtype=torch.uint8)
    image[0, 2:6, 1:4] = 255  # an asymmetric blob: a flip or rotation would move it
    augment = TASK.augmenter(load_like(image), policy, 1.0)
    assert torch.equal(augment(image), image)


def load_like(image):
    from pipelines.regression import RegressData

    return RegressData(image[None], torch.zeros(1, 1), ["angle"], [0.5], [0.5])


def test_meter_matches_the_definitions():
    generator = torch.Generator().manual_seed(0)
    true = torch.rand(50, 2, generator=generator) * 90 - 45
    predicted = true + torch.randn(50, 2, generator=generator) * 3
    meter = RegressMeter(["angle", "slant"])
    meter.update(predicted[:20], true[:20])
    meter.update(predicted[20:], true[20:])
    report = meter.compute()
    error = (predicted - true).double()
    assert report.scalars["mae"] == pytest.approx(float(error.abs().mean()), rel=1e-5)
    assert report.scalars["rmse"] == pytest.approx(float(error.square().mean().sqrt()), rel=1e-5)
    r2 = 1 - error.square().sum(0) / (true.double() - true.double().mean(0)).square().sum(0)
    assert report.scalars["r2"] == pytest.approx(float(r2.mean()), rel=1e-5)
    assert report.per_class["mae"]["slant"] == pytest.approx(float(error[:, 1].abs().mean()), rel=1e-5)
    assert len(report.records[SCATTER]) == 100 and set(report.records[SCATTER][0]) == {"true", "predicted", "target"}
