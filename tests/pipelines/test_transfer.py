"""Transfer learning from params: a pretrained trunk, frozen stages (Keras `trainable=False`: weights and
BatchNorm statistics), gradual unfreezing at a scaled learning rate, and resuming across the unfreeze."""

from __future__ import annotations

import pytest
import torch

from models import _checkpoint as checkpoint
from models._registry import build
from pipelines.datasets import load_classify
from pipelines.engine import CHECKPOINT, EngineSettings, batches_per_epoch, fit
from pipelines.errors import ConvForgeError
from pipelines.optim import lr_at, make_optimizer, set_hyperparameters
from pipelines.transfer import load_pretrained, pretrained_source

CPU = EngineSettings(device="cpu", num_threads=1, seed=3)
TIMING = {"epoch_s", "wall_s", "images_per_s"}
BACKBONE = {"depth": 10, "width": 8}


@pytest.fixture(scope="module")
def digits(prepared_classify):
    return load_classify(prepared_classify, "train").subset(96, 0), load_classify(prepared_classify, "val")


@pytest.fixture(scope="module")
def cfg(project_params):
    return project_params.train.classify.updated(epochs=1, batch_size=32, warmup_epochs=0, lr=0.05, freeze=2)


def resnet(data):
    torch.manual_seed(0)
    return build("classify", "resnet", len(data.classes), data.in_channels, data.image_size, **BACKBONE)


def snapshot(module):
    """Parameters and buffers (BN running_mean/var/num_batches_tracked) as copies."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return {k for k in a if torch.equal(a[k], b[k])}


def learned(history):
    return [{k: v for k, v in r.metrics.items() if k not in TIMING} for r in history]


def test_frozen_stages_keep_weights_and_batchnorm_statistics(digits, cfg):
    train, val = digits
    model = resnet(train)
    frozen_before, rest_before = snapshot(model.features[:2]), snapshot(model.features[2:])
    assert any(k.endswith("running_mean") for k in frozen_before)  # the stem has BatchNorm to hold
    # precise BN recomputes the statistics of the layers that trained, not the frozen ones'
    fit(model, "classify", train, val, cfg.updated(precise_bn=len(train)), CPU, log=None)
    assert same(frozen_before, snapshot(model.features[:2])) == set(frozen_before)  # bit-identical, buffers too
    changed = set(rest_before) - same(rest_before, snapshot(model.features[2:]))
    assert {k for k in rest_before if "running" in k or k.endswith("weight")} <= changed
    assert all(p.requires_grad for p in model.parameters())  # handed back as trainable as it came


def test_unfreeze_epoch_fine_tunes_the_frozen_stages_at_a_scaled_rate(digits, cfg, tmp_path):
    train, val = digits
    run = cfg.updated(epochs=2, unfreeze_epoch=2, unfreeze_lr_scale=0.25)
    model = resnet(train)
    start = snapshot(model.features[:2])
    after_epoch = {}
    fit(model, "classify", train, val, run, CPU, checkpoint_dir=tmp_path, log=None,
        on_epoch=lambda r: after_epoch.update({r.epoch: snapshot(model.features[:2])}))
    assert same(start, after_epoch[1]) == set(start)
    assert not same(start, after_epoch[2]) & {k for k in start if k.endswith(("weight", "running_var"))}
    steps = batches_per_epoch(len(train), run.batch_size)
    groups = torch.load(tmp_path / CHECKPOINT, weights_only=True)["optimizer"]["param_groups"]
    last = 2 * steps - 1  # the step whose rates the checkpoint holds
    assert [g.get("frozen_trunk", False) for g in groups] == [False, False, True, True]
    assert groups[0]["lr"] == lr_at(last, run, steps) > 0
    assert groups[2]["lr"] == groups[3]["lr"] == lr_at(last, run, steps) * 0.25
    assert [g["weight_decay"] for g in groups] == [run.weight_decay, 0.0, run.weight_decay, 0.0]
    # while frozen the frozen stages' groups run at lr 0
    held = checkpoint.trunk_parameters(model, 2)
    optimizer = make_optimizer(model, run, held)
    set_hyperparameters(optimizer, steps - 1, run, steps)
    assert [g["lr"] for g in optimizer.param_groups] == [lr_at(steps - 1, run, steps)] * 2 + [0.0, 0.0]


@pytest.mark.parametrize("stop_after", [1, 2])
def test_a_run_resumed_across_the_unfreeze_epoch_equals_the_uninterrupted_one(digits, cfg, tmp_path, stop_after):
    train, val = digits
    run = cfg.updated(epochs=3, unfreeze_epoch=2)

    def interrupt(result):
        if result.epoch == stop_after:
            raise InterruptedError

    with pytest.raises(InterruptedError):
        fit(resnet(train), "classify", train, val, run, CPU, checkpoint_dir=tmp_path, on_epoch=interrupt, log=None)
    resumed = fit(resnet(train), "classify", train, val, run, CPU, checkpoint_dir=tmp_path, log=None)
    whole = fit(resnet(train), "classify", train, val, run, CPU, log=None)
    assert learned(resumed.history) == learned(whole.history)
    a, b = snapshot(resumed.model), snapshot(whole.model)
    assert same(a, b) == set(a)


def test_a_checkpoint_of_another_freeze_is_refused_in_one_line(digits, cfg, tmp_path):
    train, val = digits

    def stop(result):
        raise InterruptedError

    with pytest.raises(InterruptedError):
        fit(resnet(train), "classify", train, val, cfg.updated(epochs=2, freeze=0), CPU, checkpoint_dir=tmp_path,
            on_epoch=stop, log=None)
    with pytest.raises(ConvForgeError, match="saved with freeze 0, now 2") as error:
        fit(resnet(train), "classify", train, val, cfg.updated(epochs=2), CPU, checkpoint_dir=tmp_path, log=None)
    assert "\n" not in str(error.value)


def saved_classifier(folder, image_size=64):
    torch.manual_seed(0)
    classifier = build("classify", "resnet", 10, 1, image_size, **BACKBONE)
    config = {"task": "classify", "family": "resnet", "num_classes": 10, "in_channels": 1, "image_size": image_size,
              "hparams": BACKBONE}
    checkpoint.save(classifier, config, folder)
    return classifier


@pytest.mark.parametrize("task,family", [("detect", "fcos"), ("segment", "fcn")])
def test_pretrained_folder_or_task_loads_a_classifier_trunk(tmp_path, task, family):
    classifier = saved_classifier(tmp_path / "artifacts/models/classify")
    for spec in (str(tmp_path / "artifacts/models/classify"), "classify"):
        model = build(task, family, 3, 1, 64, backbone_hparams=BACKBONE)
        lines = []
        report = load_pretrained(model, spec, task, root=tmp_path, log=lines.append)
        assert report["matched"] > 0 and report["wrong_shape"] == 0
        assert len(lines) == 1 and f"loaded {report['matched']}/" in lines[0]
        trunk = dict(model.named_parameters())
        stem = next(k for k in trunk if k.endswith("features.0.0.weight"))
        assert torch.equal(trunk[stem], classifier.features[0][0].weight)
    assert load_pretrained(model, None, task) is None


@pytest.mark.parametrize("task,family", [("detect", "faster_rcnn"), ("segment", "fcn"), ("segment", "unet")])
def test_a_classifier_trunk_brings_its_family_and_hparams_whatever_backbone_was_drawn(tmp_path, prepared_scenes,
                                                                                      prepared_classify, task, family):
    from models import family as registry_family
    from pipelines.recipe import run_model
    from pipelines.tasks import get_task

    classifier = saved_classifier(tmp_path / "classify", image_size=16)  # the scenes are 40 px
    data = get_task(task).load_split(prepared_scenes, "train")
    key = registry_family(task, family).trunk_key  # backbone, or U-Net's encoder
    drawn = {key: "mobilenet_v2", f"{key}_hparams": {}}  # what a search space may still draw
    hparams, model, report = run_model(task, family, drawn, data, seed=0, pretrained=str(tmp_path / "classify"))
    assert (hparams[key], hparams[f"{key}_hparams"]) == ("resnet", {**BACKBONE, "image_size": 16})
    # the classifier's stride plan: its stem keeps full resolution on 16 px items, and so on the scenes
    assert model.state_dict() and classifier.features[0][0].stride == (1, 1)
    assert next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).stride == (1, 1)
    assert report["trunk_matched"] == report["trunk"] > 0 and report["wrong_shape"] == 0
    stem = next(k for k, _ in model.named_parameters() if k.endswith("features.0.0.weight"))
    assert torch.equal(dict(model.named_parameters())[stem], classifier.features[0][0].weight)
    with pytest.raises(ConvForgeError, match="unet has no classifier trunk") as error:
        run_model("reconstruct", "unet", {}, get_task("reconstruct").load_split(prepared_classify, "train"), seed=0,
                  pretrained=str(tmp_path / "classify"))
    assert "\n" not in str(error.value)


def test_a_classifier_trunk_that_gives_no_pyramid_leaves_the_detector_its_own_backbone(tmp_path, prepared_scenes):
    from pipelines.recipe import run_model
    from pipelines.tasks import get_task

    config = {"task": "classify", "family": "lenet5", "num_classes": 3, "in_channels": 1, "image_size": 16,
              "hparams": {}}
    checkpoint.save(build("classify", "lenet5", 3, 1, 16), config, tmp_path / "lenet5")
    data, lines = get_task("detect").load_split(prepared_scenes, "train"), []
    hparams, model, report = run_model("detect", "fcos", {}, data, seed=0, pretrained=str(tmp_path / "lenet5"),
                                       log=lines.append)
    assert report is None and hparams["backbone"] == "resnet"  # the search's, trained from scratch
    (line,) = lines
    assert "lenet5 trunk does not fit fcos" in line and "trains its resnet backbone from scratch" in line
    torch.manual_seed(0)
    scratch = build("detect", "fcos", len(data.classes), 1, data.image_size, **hparams)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), scratch.state_dict().values()))


def test_pretrained_names_are_checked_in_one_line(tmp_path):
    with pytest.raises(ConvForgeError, match="this stage's own model"):
        pretrained_source("classify", "classify", tmp_path)
    with pytest.raises(ConvForgeError, match=r"holds no trained model: run `dvc repro train@classify` first"):
        pretrained_source("classify", "detect", tmp_path)
    assert pretrained_source("weights/cls", "detect", tmp_path) == str(tmp_path / "weights/cls")
    config = {"task": "classify", "family": "lenet5", "num_classes": 3, "in_channels": 1, "image_size": 16,
              "hparams": {}}
    checkpoint.save(build("classify", "lenet5", 3, 1, 16), config, tmp_path / "lenet5")
    with pytest.raises(ConvForgeError, match="no tensor") as error:  # a saved model whose trunk fits nothing
        load_pretrained(build("classify", "vgg", 3, 1, 16), str(tmp_path / "lenet5"), "detect")
    assert "\n" not in str(error.value)


def test_missing_torchvision_weights_fail_offline_in_one_line(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        model = build("classify", "resnet", 10, 3, 32, depth=18, width=64)
        with pytest.raises(ConvForgeError) as error:
            load_pretrained(model, "torchvision:ResNet18_Weights.IMAGENET1K_V1", "classify")
    finally:
        torch.hub.set_dir(previous)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "checkpoints" / "resnet18-f37072fd.pth") in message
