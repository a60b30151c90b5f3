"""The one training loop: determinism, resume, options, schedules, evaluate/predict for every task."""

from __future__ import annotations

import math

import pytest
import torch

from models._registry import build
from pipelines.datasets import load_classify, load_scenes
from pipelines.engine import CHECKPOINT, EngineSettings, batches_per_epoch, evaluate, fit, inputs_of, predict
from pipelines.optim import lr_at

CPU = EngineSettings(device="cpu", num_threads=1, seed=3)
TIMING = {"epoch_s", "wall_s", "images_per_s"}


@pytest.fixture(scope="module")
def digits(prepared_classify):
    return load_classify(prepared_classify, "train").subset(160, 0), load_classify(prepared_classify, "val")


@pytest.fixture(scope="module")
def cfg(project_params):
    return project_params.train.classify.updated(epochs=2, batch_size=32, warmup_epochs=1, lr=0.05)


def lenet(data, **hparams):
    torch.manual_seed(0)
    return build("classify", "lenet5", len(data.classes), data.in_channels, data.image_size, **hparams)


def learned(history):
    """Per-epoch metrics without the timings."""
    return [{k: v for k, v in r.metrics.items() if k not in TIMING} for r in history]


def test_two_cpu_runs_give_identical_metrics_with_augmentation(digits, cfg, project_params):
    train, val = digits
    runs = [fit(lenet(train, dropout=0.2), "classify", train, val, cfg, CPU, policy=project_params.augment.policy,
                log=None) for _ in range(2)]
    assert learned(runs[0].history) == learned(runs[1].history)
    assert [r.epoch for r in runs[0].history] == [1, 2]
    assert all(torch.equal(a, b) for a, b in zip(runs[0].model.state_dict().values(),
                                                 runs[1].model.state_dict().values()))


def test_bf16_training_on_the_cpu_is_deterministic_and_scored_in_float32(digits, cfg, project_params):
    """AMP bf16 on the CPU (`amp: bf16`; emulated, still deterministic, without bf16 instructions) changes the
    training steps only: two runs give the same bits, and validation, evaluate and predict compute in float32,
    what the service computes, so a model's score under bf16 settings is its score with AMP off."""
    train, val = digits
    bf16 = EngineSettings(device="cpu", amp="bf16", num_threads=1, seed=3)
    fp32 = EngineSettings(device="cpu", amp="off", num_threads=1, seed=3)
    runs = [fit(lenet(train), "classify", train, val, cfg, bf16, policy=project_params.augment.policy, log=None)
            for _ in range(2)]
    assert learned(runs[0].history) == learned(runs[1].history)
    assert all(torch.equal(a, b) for a, b in zip(runs[0].model.state_dict().values(),
                                                 runs[1].model.state_dict().values()))
    model = runs[0].model
    assert evaluate(model, "classify", val, bf16) == evaluate(model, "classify", val, fp32)
    assert evaluate(model, "classify", val, fp32)["accuracy"] == pytest.approx(runs[0].best_score)  # val: float32 too
    probs = predict(model, "classify", val.images[:16], val.mean, val.std, bf16)
    assert probs.dtype == torch.float32 and torch.equal(probs, predict(model, "classify", val.images[:16], val.mean,
                                                                       val.std, fp32))
    plain = fit(lenet(train), "classify", train, val, cfg, fp32, policy=project_params.augment.policy, log=None)
    assert not torch.equal(next(plain.model.parameters()), next(model.parameters()))  # the steps did run in bf16


def test_an_interrupted_run_resumes_at_the_next_epoch_with_the_same_result(digits, cfg, project_params, tmp_path):
    train, val = digits
    options = cfg.updated(ema_decay=0.9, label_smoothing=0.1, mixup_alpha=0.2, grad_clip=1.0)

    class Interrupted(Exception):
        pass

    def stop_after_first(result):
        assert (tmp_path / CHECKPOINT).is_file()  # written before the callback
        raise Interrupted

    with pytest.raises(Interrupted):
        fit(lenet(train), "classify", train, val, options, CPU, policy=project_params.augment.policy,
            checkpoint_dir=tmp_path, on_epoch=stop_after_first, log=None)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)  # tensors and plain values only
    assert state["epoch"] == 1 and state["step"] == batches_per_epoch(len(train), options.batch_size)
    lines = []
    resumed = fit(lenet(train), "classify", train, val, options, CPU, policy=project_params.augment.policy,
                  checkpoint_dir=tmp_path, log=lines.append)
    assert any("resuming classify at epoch 2" in line for line in lines)
    assert sum(line.startswith("epoch ") for line in lines) == 1
    whole = fit(lenet(train), "classify", train, val, options, CPU, policy=project_params.augment.policy, log=None)
    assert learned(resumed.history) == learned(whole.history)
    assert resumed.best_epoch == whole.best_epoch and resumed.best_score == whole.best_score


def test_progress_lines_and_best_epoch_selection(digits, cfg):
    train, val = digits
    lines = []
    result = fit(lenet(train), "classify", train, val, cfg.updated(optimizer="adamw", lr=0.003,
                                                                     schedule="onecycle"), CPU, log=lines.append)
    assert lines[0].startswith("device: cpu (") and f"amp {CPU.choice().amp}," in lines[0]  # resolved, once a run
    epochs = lines[1:]
    assert len(epochs) == 2 and all("loss" in l and "val_accuracy" in l and "img/s" in l and "ETA" in l for l in epochs)
    scores = [r.score for r in result.history]
    assert result.best_score == max(scores) and result.history[result.best_epoch - 1].score == max(scores)
    assert result.metric == "val_accuracy" and result.images_per_s > 0
    metrics = result.history[-1].metrics
    assert {"train_loss", "val_accuracy", "val_top5", "val_f1_macro", "val_nll", "val_ece", "lr"} <= set(metrics)
    assert evaluate(result.model, "classify", val, CPU)["accuracy"] == pytest.approx(result.best_score)


def test_early_stopping_when_validation_stops_improving(digits, cfg):
    train, val = digits
    # A learning rate too small to change any prediction: the score cannot improve after epoch 1.
    frozen = cfg.updated(epochs=5, lr=1e-9, schedule="constant", warmup_epochs=0, early_stop_patience=2)
    result = fit(lenet(train, variant="classic"), "classify", train, val, frozen, CPU, log=None)
    assert [r.epoch for r in result.history] == [1, 2, 3] and result.best_epoch == 1


def test_precise_bn_validates_with_the_statistics_of_the_training_items(digits, cfg):
    """Before each validation the BN layers get the exact mean and variance of their inputs over `precise_bn`
    un-augmented training items; the running averages training leaves are off, and are what 0 keeps."""
    train, val = digits
    one_batch = cfg.updated(epochs=1, batch_size=len(train), warmup_epochs=0, precise_bn=len(train))

    def first_bn_input(model):
        seen = []
        norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        hook = norm.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
        with torch.no_grad():
            model.eval()(inputs_of(train.images, train.mean, train.std))
        hook.remove()
        return norm, seen[0]

    def resnet():
        torch.manual_seed(0)
        return build("classify", "resnet", len(train.classes), train.in_channels, train.image_size, depth=10, width=8)

    precise = fit(resnet(), "classify", train, val, one_batch, CPU, log=None).model
    norm, inputs = first_bn_input(precise)
    assert torch.allclose(norm.running_mean, inputs.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(norm.running_var, inputs.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    assert norm.momentum == 0.1  # put back
    running = fit(resnet(), "classify", train, val, one_batch.updated(precise_bn=0), CPU, log=None).model
    norm, inputs = first_bn_input(running)  # one momentum-0.1 step from (0, 1): far from the items' statistics
    assert not torch.allclose(norm.running_mean, inputs.mean((0, 2, 3)), atol=1e-3)
    assert torch.equal(running.state_dict()["features.0.0.weight"], precise.state_dict()["features.0.0.weight"])


def test_precise_bn_recalibrates_the_averaged_weights_when_ema_is_on(digits, cfg):
    """With EMA on, the averaged weights are what is validated and kept: their BN layers get the exact
    statistics of their own inputs (left alone, they would hold an average of the trained weights' running ones)."""
    train, val = digits
    # two steps: the first copies the trained weights into the average, the second blends them
    two_steps = cfg.updated(epochs=2, batch_size=len(train), warmup_epochs=0, precise_bn=len(train), ema_decay=0.5)
    torch.manual_seed(0)
    model = build("classify", "resnet", len(train.classes), train.in_channels, train.image_size, depth=10, width=8)
    kept = fit(model, "classify", train, val, two_steps, CPU, log=None).model.eval()
    norm = next(m for m in kept.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    hook = norm.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    with torch.no_grad():
        kept(inputs_of(train.images, train.mean, train.std))
    hook.remove()
    assert torch.allclose(norm.running_mean, seen[0].mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(norm.running_var, seen[0].var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)


def test_a_last_batch_of_one_item_is_dropped():
    assert batches_per_epoch(65, 32) == 2 and batches_per_epoch(66, 32) == 3


def test_a_resumed_run_takes_a_changed_config(digits, cfg, tmp_path):
    """A tuner's PBT may change the learning rate, momentum or weight decay of a checkpointed run."""
    train, val = digits
    before, steps = cfg.updated(epochs=3), batches_per_epoch(len(train), cfg.batch_size)

    def stop(result):
        raise InterruptedError

    with pytest.raises(InterruptedError):
        fit(lenet(train), "classify", train, val, before, CPU, checkpoint_dir=tmp_path, on_epoch=stop, log=None)
    after = before.updated(lr=0.02, momentum=0.5, weight_decay=1e-3)
    lines = []
    resumed = fit(lenet(train), "classify", train, val, after, CPU, checkpoint_dir=tmp_path, log=lines.append)
    assert lines[0].startswith("device: cpu (")
    assert lines[1] == ("resuming classify at epoch 2 with changed config: lr 0.05 -> 0.02, momentum 0.9 -> 0.5, "
                        "weight_decay 0.0005 -> 0.001")
    assert [r.metrics["lr"] for r in resumed.history] == [
        lr_at(steps, before, steps), lr_at(2 * steps, after, steps), lr_at(3 * steps, after, steps)]
    whole = fit(lenet(train), "classify", train, val, before, CPU, log=None)
    assert learned(resumed.history)[0] == learned(whole.history)[0]  # the first epoch ran before the change
    assert learned(resumed.history)[1] != learned(whole.history)[1]


@pytest.mark.parametrize("task,family,hparams", [
    ("detect", "fcos", {"head_convs": 1, "backbone_hparams": {"depth": 10, "width": 8}}),
    ("segment", "unet", {"depth": 2, "width": 8}),
])
def test_scene_tasks_train_with_joint_augmentation_and_predict(prepared_scenes, project_params, task, family, hparams):
    train, val = load_scenes(prepared_scenes, "train").subset(16, 0), load_scenes(prepared_scenes, "val")
    torch.manual_seed(0)
    model = build(task, family, len(train.classes), train.in_channels, train.image_size, **hparams)
    # precise BN on: a detector recomputes its statistics through its inference path (no targets)
    cfg = project_params.train.task(task).updated(epochs=1, batch_size=8, warmup_epochs=0, dice_weight=0.5,
                                                  precise_bn=8)
    result = fit(model, task, train, val, cfg, CPU, policy=project_params.augment.policy, log=None)
    metric = {"detect": "val_map", "segment": "val_miou"}[task]
    assert math.isfinite(result.history[0].metrics["train_loss"]) and 0.0 <= result.best_score <= 1.0
    assert metric in result.history[0].metrics
    out = predict(result.model, task, val.images[:3], val.mean, val.std, CPU)
    if task == "detect":
        assert len(out) == 3 and all(set(d) >= {"boxes", "scores", "labels"} for d in out)
        assert all(((d["labels"] >= 0) & (d["labels"] < len(val.classes))).all() for d in out)
    else:
        assert out.shape == (3, *val.images.shape[-2:]) and int(out.max()) <= len(val.classes)
    flat = evaluate(result.model, task, val, CPU)
    assert all(isinstance(v, float) for v in flat.values())


@pytest.mark.parametrize("task,family,hparams", [
    ("classify", "resnet", {"width": 8}),
    ("detect", "faster_rcnn", {"fpn_channels": 16, "backbone_hparams": {"width": 8}}),
    ("segment", "unet", {"encoder": "resnet", "encoder_hparams": {"width": 8}, "width": 8}),
])
def test_training_reads_no_uninitialized_memory(digits, prepared_scenes, project_params, monkeypatch, task, family,
                                                hparams):
    """The default families train to the same bits with torch's NaN fill of new tensors (which a read of memory no op
    wrote would carry into the weights) and without it, as deterministic runs train (runtime.apply_determinism)."""
    from pipelines import runtime

    train, val = digits if task == "classify" else (load_scenes(prepared_scenes, "train").subset(16, 0),
                                                     load_scenes(prepared_scenes, "val"))
    cfg = project_params.train.task(task).updated(epochs=1, batch_size=8, warmup_epochs=0, precise_bn=0,
                                                  pretrained=None)
    weights = []
    for fill in (True, False):
        monkeypatch.setattr(runtime, "FILL_UNINITIALIZED_MEMORY", fill)
        torch.manual_seed(0)
        model = build(task, family, len(train.classes), train.in_channels, train.image_size, **hparams)
        filled = []
        result = fit(model, task, train, val, cfg, CPU, policy=project_params.augment.policy, log=None,
                     on_epoch=lambda _: filled.append(torch.utils.deterministic.fill_uninitialized_memory))
        assert filled == [fill] and math.isfinite(result.history[0].metrics["train_loss"])
        weights.append(result.model.state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


@pytest.mark.parametrize("augmented", [False, True])
def test_a_lazily_read_split_trains_exactly_like_the_same_split_in_memory(prepared_classify, cfg, project_params,
                                                                         augmented):
    """DataLoader workers over the memory-mapped .npy give the batches the in-memory slicing path gives."""
    from pipelines.engine import loader_workers

    policy = project_params.augment.policy if augmented else None
    runs = []
    # per-sample augmentation draws from each worker's own RNG stream, so that case compares in-process reads
    for in_memory_bytes, workers in ((2**30, 0), (0, 0 if augmented else 1)):
        train = load_classify(prepared_classify, "train", in_memory_bytes).subset(96, 0)
        val = load_classify(prepared_classify, "val", in_memory_bytes)
        settings = EngineSettings(device="cpu", num_threads=1, seed=3, num_workers=workers)
        runs.append(fit(lenet(train), "classify", train, val, cfg.updated(epochs=1), settings, policy=policy,
                        log=None))
    assert learned(runs[0].history) == learned(runs[1].history)
    lazy = load_classify(prepared_classify, "train", 0)
    assert loader_workers(EngineSettings(num_workers="auto"), load_classify(prepared_classify, "train")) == 0
    assert loader_workers(EngineSettings(num_workers="auto", concurrent_runs=64), lazy) == 0
    assert loader_workers(EngineSettings(num_workers=3), lazy) == 3


@pytest.mark.parametrize("task_name", ["classify", "regress"])
def test_crop_and_flip_batches_are_fetched_whole_and_match_item_by_item(prepared_classify, project_params, monkeypatch,
                                                                        task_name):
    """The default policy (crop and flip) reaches the DataLoader's batched fetch, `__getitems__`, which augments each
    batch in one gather: the same batches as item by item (the path of every other policy), no item fetched alone."""
    from pipelines.engine import _Samples, seed_epoch, train_batches
    from pipelines.tasks import get_task

    task = get_task(task_name)
    train = task.load_split(prepared_classify, "train").subset(100, 0)
    augment = task.augmenter(train, project_params.augment.policy, 0.63)
    assert hasattr(augment, "batch")

    def epoch() -> list:
        return list(train_batches(task, train, 32, seed_epoch(3, 1), augment, CPU, pin=False))

    with monkeypatch.context() as patch:
        patch.delattr(_Samples, "__getitems__")
        by_item = epoch()

    def alone(self, i):
        raise AssertionError("an item was fetched alone")

    monkeypatch.setattr(_Samples, "__getitem__", alone)
    whole = epoch()
    assert [len(b) for b in whole] == [32, 32, 32, 4]
    for a, b in zip(by_item, whole, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(whole[0].images, task.gather(train, torch.arange(32)).images)  # augmented and shuffled


def test_a_run_without_loss_scaling_resumes_with_it(digits, cfg, tmp_path):
    """A checkpoint of a run without loss scaling (the CPU, bf16, amp off) holds an empty GradScaler state, which an
    fp16 run's scaler refused ('The source state dict is empty'): resumed with `-S train.amp=fp16`, or on a GPU
    without bf16, the run stopped. It resumes with a new scale."""
    from dataclasses import replace

    from pipelines.engine import resume, set_up

    train, val = digits

    def stop(result):
        raise InterruptedError

    with pytest.raises(InterruptedError):
        fit(lenet(train), "classify", train, val, cfg, CPU, checkpoint_dir=tmp_path, on_epoch=stop, log=None)
    setup = set_up(lenet(train), "classify", train, cfg, CPU, None)
    assert not setup.scaler.is_enabled()
    scaling = replace(setup, scaler=torch.amp.GradScaler("cpu", enabled=True))  # fp16's, on the device at hand
    state = resume(tmp_path / CHECKPOINT, scaling, cfg, say=lambda line: None)
    assert state.epoch == 1 and scaling.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()


def test_trials_sharing_a_gpu_keep_their_share_of_it_for_resident_data():
    """A split went onto the GPU when under a quarter of the card's free memory, whatever the run's share: four
    trials starting together on one card (gpus_per_trial 0.25) each saw the same free memory, and 5 GB of own data
    each would take 20 of a 24 GB card before any activation. Each run now has a quarter of its share."""
    from pipelines.engine import fits_resident

    gib = 2**30
    assert fits_resident(5 * gib, 24 * gib, sharing=1)
    assert not fits_resident(5 * gib, 24 * gib, sharing=4) and fits_resident(1.5 * gib, 24 * gib, sharing=4)
