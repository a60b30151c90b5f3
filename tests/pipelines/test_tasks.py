"""Per-task adapters: losses (GoogLeNet's auxiliary heads, Dice), label shifts, mixing, collation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models._registry import AuxLogits, build
from pipelines.datasets import load_classify, load_scenes
from pipelines.params import TrainConfig
from pipelines.tasks import AUX_WEIGHT, PRIMARY, TASKS, get_task, main_logits, soft_dice_loss


@pytest.fixture(scope="module")
def cfg(project_params) -> TrainConfig:
    return project_params.train.classify.updated(label_smoothing=0.0)


def test_googlenet_aux_losses_count_in_training_only(prepared_classify, cfg):
    data = load_classify(prepared_classify, "val")
    torch.manual_seed(0)
    model = build("classify", "googlenet", len(data.classes), data.in_channels, data.image_size,
                  aux_logits=True, dropout=0.0)
    images = (data.images[:6].float() / 255 - 0.5) / 0.5
    labels = data.labels[:6]
    task = get_task("classify")
    model.train()
    torch.manual_seed(1)  # the auxiliary heads have their own dropout
    output = model(images)
    assert isinstance(output, AuxLogits) and output.aux
    expected = F.cross_entropy(output.logits, labels) + AUX_WEIGHT * sum(F.cross_entropy(a, labels) for a in output.aux)
    torch.manual_seed(1)
    assert float(task.loss(model, images, labels, cfg)) == pytest.approx(float(expected), rel=1e-5)
    model.eval()
    eval_logits = task.outputs(model, images)
    assert eval_logits.shape == (6, len(data.classes))
    assert torch.equal(main_logits(eval_logits), eval_logits)


def test_label_smoothing_and_mixup_give_soft_targets(prepared_classify, cfg):
    data = load_classify(prepared_classify, "val")
    task = get_task("classify")
    mixer = task.mixer(cfg.updated(mixup_alpha=0.4, cutmix_alpha=1.0), len(data.classes))
    images = data.images[:8].float()
    torch.manual_seed(1)
    mixed, soft = mixer(images, data.labels[:8])
    assert mixed.shape == images.shape and soft.shape == (8, len(data.classes))
    assert torch.allclose(soft.sum(1), torch.ones(8))
    assert task.mixer(cfg, len(data.classes)) is None
    logits = torch.randn(4, 3)
    smooth = task.loss(lambda x: x, logits, torch.tensor([0, 1, 2, 0]), cfg.updated(label_smoothing=0.1))
    assert smooth == pytest.approx(float(F.cross_entropy(logits, torch.tensor([0, 1, 2, 0]), label_smoothing=0.1)))


def test_detection_labels_shift_by_one_for_torchvision_and_back(prepared_scenes, cfg):
    data = load_scenes(prepared_scenes, "val")
    task = get_task("detect")
    batch = task.gather(data, torch.arange(2))
    assert batch.images.shape[0] == 2 and len(batch.targets) == 2
    seen = {}

    def model(images, targets=None):
        seen["labels"] = [t["labels"] for t in targets]
        return {"loss_a": torch.tensor(1.5), "loss_b": torch.tensor(0.25)}

    assert task.loss(model, batch.images.float(), batch.targets, cfg) == pytest.approx(1.75)
    assert all(torch.equal(s, t["labels"] + 1) for s, t in zip(seen["labels"], batch.targets))
    raw = [{"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([3]),
            "masks": torch.tensor([[[[0.2, 0.7], [0.6, 0.1]]]])}]
    decoded = task.decode(raw)[0]
    assert decoded["labels"].tolist() == [2]
    assert decoded["masks"].tolist() == [[[False, True], [True, False]]]


def test_segmentation_loss_adds_dice_and_decodes_argmax(cfg):
    target = torch.tensor([[[0, 1], [2, 2]]])
    perfect = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 40
    assert soft_dice_loss(perfect, target) == pytest.approx(0.0, abs=1e-6)
    assert soft_dice_loss(-perfect, target) > 0.5  # all wrong (eps = 1 smooths tiny counts)
    task = get_task("segment")
    ce = task.loss(lambda x: x, -perfect, target, cfg)
    with_dice = task.loss(lambda x: x, -perfect, target, cfg.updated(dice_weight=1.0))
    assert with_dice == pytest.approx(float(ce + soft_dice_loss(-perfect, target)), rel=1e-6)
    assert torch.equal(task.decode(perfect), target)


def test_ignored_pixels_count_in_no_loss(cfg):
    """A masks: dataset's 255 (VOC's void boundaries, IGNORE) trained as background: now the cross-entropy and the
    Dice term leave those pixels out (target 255 was out of range for both: the loss raised)."""
    from pipelines.scenes import IGNORE

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 1:3, 1:4] = IGNORE
    kept = target != IGNORE
    flat_logits = logits.permute(1, 0, 2, 3)[:, kept].T  # [P, K]: the kept pixels only
    flat_logits_4d = flat_logits.T[None, :, None, :]     # [1, K, 1, P]
    flat_target = target[kept][None, None, :]            # [1, 1, P]
    task = get_task("segment")
    loss = task.loss(lambda x: x, logits, target, cfg.updated(dice_weight=1.0, label_smoothing=0.1))
    expected = (F.cross_entropy(flat_logits, target[kept], label_smoothing=0.1)
                + soft_dice_loss(flat_logits_4d, flat_target))
    assert loss == pytest.approx(float(expected), rel=1e-6)
    assert soft_dice_loss(logits, target) == pytest.approx(float(soft_dice_loss(flat_logits_4d, flat_target)),
                                                           rel=1e-6)


def test_per_sample_augmentation_keeps_targets_in_step(prepared_scenes, project_params):
    data = load_scenes(prepared_scenes, "train")
    policy = project_params.augment.policy.model_copy(update={"hflip": 1.0})
    for name in ("detect", "segment"):
        task = get_task(name)
        augment = task.augmenter(data, policy, 1.0)
        image, target = task.item(data, 0, augment)
        assert torch.equal(image, data.images[0].flip(-1))
        if name == "segment":
            assert torch.equal(target, data.masks[0].flip(-1))
        else:
            assert torch.equal(target["masks"], data.targets[0]["masks"].flip(-1))
        batch = task.collate([task.item(data, i, augment) for i in range(3)])
        assert batch.images.shape[0] == 3
        assert task.augmenter(data, policy, 0.0) is None
    assert PRIMARY == {"classify": "val_accuracy", "detect": "val_map", "segment": "val_miou",
                       "regress": "val_r2", "reconstruct": "val_psnr"}


def test_every_adapter_declares_what_the_rest_of_the_project_reads():
    from pipelines.export import EXPORTABLE

    for name, task in TASKS.items():
        assert task.name == name and get_task(name) is task
        assert task.metric and task.pr_title and task.headline and task.data
        assert isinstance(task.exports_onnx, bool) and isinstance(task.confusion, bool)
        assert callable(task.visuals)
    assert EXPORTABLE == tuple(name for name, task in TASKS.items() if task.exports_onnx)
