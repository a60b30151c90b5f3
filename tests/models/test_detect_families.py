"""Every detect family: torchvision's output format in eval mode, finite losses in train mode."""

from __future__ import annotations

import pytest
import torch

from models import build, families

DETECT = families("detect")
SIZE = 40  # the test scenes' canvas; padded to 48 inside torchvision (size_divisible 16)


def scene_targets(count: int, num_classes: int) -> list[dict[str, torch.Tensor]]:
    """Two boxes (with masks) per image, xyxy pixel-edge coordinates, labels = class index + 1."""
    targets = []
    for i in range(count):
        boxes = torch.tensor([[2.0 + i, 3.0, 18.0 + i, 25.0], [20.0, 14.0, 38.0, 36.0]])
        masks = torch.zeros(2, SIZE, SIZE, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "labels": torch.tensor([1, num_classes]), "masks": masks})
    return targets


def test_the_issue_families_are_registered() -> None:
    assert {"faster_rcnn", "mask_rcnn", "fcos"} <= set(DETECT)


@pytest.mark.parametrize("name", DETECT)
def test_train_mode_gives_finite_losses_and_grads(name: str) -> None:
    torch.manual_seed(0)
    model = build("detect", name, 3, 1, SIZE).train()
    images = [torch.randn(1, SIZE, SIZE) for _ in range(2)]
    losses = model(images, scene_targets(2, 3))
    assert isinstance(losses, dict) and losses
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", DETECT)
def test_eval_mode_gives_torchvision_detections(name: str) -> None:
    torch.manual_seed(0)
    model = build("detect", name, 3, 3, SIZE, score_thresh=0.0) if name == "fcos" else build("detect", name, 3, 3, SIZE)
    model.eval()
    assert 10_000 <= sum(p.numel() for p in model.parameters()) <= 3_000_000
    with torch.no_grad():
        out = model([torch.randn(3, SIZE, SIZE) for _ in range(2)])
    assert isinstance(out, list) and len(out) == 2
    for det in out:
        k = det["boxes"].shape[0]
        assert det["boxes"].shape == (k, 4) and det["boxes"].dtype == torch.float32
        assert det["scores"].shape == (k,) and det["labels"].shape == (k,) and det["labels"].dtype == torch.int64
        assert ((det["labels"] >= 1) & (det["labels"] <= 3)).all()  # label = class index + 1
        assert k <= 20
        if k:
            assert (det["boxes"] >= 0).all() and (det["boxes"] <= SIZE).all()
        if name == "mask_rcnn":
            assert det["masks"].shape == (k, 1, SIZE, SIZE)


@pytest.mark.parametrize("name", DETECT)
def test_turns_off_torchvision_resize_and_normalization(name: str) -> None:
    model = build("detect", name, 3, 1, 64)
    assert model.transform.min_size == (64,) and model.transform.max_size == 64
    assert model.transform.image_mean == [0.0] and model.transform.image_std == [1.0]
    image = torch.rand(1, 64, 64)
    batch, _ = model.transform([image])
    assert torch.equal(batch.tensors[0], image)  # no resize, no normalization


@pytest.mark.parametrize("backbone", ["resnet", "mobilenet_v2", "vgg", "efficientnet", "convnext"])
def test_fcos_on_each_backbone(backbone: str) -> None:
    model = build("detect", "fcos", 2, 1, 64, backbone=backbone).train()
    losses = model([torch.randn(1, 64, 64)], [
        {"boxes": torch.tensor([[4.0, 4.0, 30.0, 28.0]]), "labels": torch.tensor([2])}])
    assert all(torch.isfinite(v) for v in losses.values())


def test_a_backbone_without_the_pyramid_strides_is_a_user_error() -> None:
    from pipelines.errors import ConvForgeError

    with pytest.raises(ConvForgeError, match="needs at least two of"):
        build("detect", "fcos", 2, 1, 64, backbone="lenet5")


@pytest.mark.parametrize("name", DETECT)
def test_default_geometry_is_todays(name: str) -> None:
    model = build("detect", name, 3, 1, 64)
    if name == "fcos":  # anchor size stride / 2 at strides 4-16
        assert [tuple(s) for s in model.anchor_generator.sizes] == [(2.0,), (4.0,), (8.0,)]
    else:  # 2 and 3 x stride at strides 4-16 and the max-pooled 32, three aspect ratios
        generator = model.rpn.anchor_generator
        assert [tuple(s) for s in generator.sizes] == [(8.0, 12.0), (16.0, 24.0), (32.0, 48.0), (64.0, 96.0)]
        assert all(tuple(r) == (0.5, 1.0, 2.0) for r in generator.aspect_ratios)


@pytest.mark.parametrize("name", DETECT)
def test_strides_past_the_trunk_add_pyramid_levels(name: str) -> None:
    from models._pyramid import CoarserLevels, level_strides

    torch.manual_seed(0)
    model = build("detect", name, 3, 1, 256, strides=[8, 16, 32, 64, 128], backbone_hparams={"depth": 10, "width": 8})
    assert isinstance(model.backbone.fpn.extra_blocks, CoarserLevels)  # the trunk stops at stride 32
    pooled = [] if name == "fcos" else [256]
    assert level_strides(model.backbone, 256, 1) == [8, 16, 32, 64, 128, *pooled]
    losses = model.train()([torch.randn(1, 256, 256)], [
        {"boxes": torch.tensor([[10.0, 10.0, 110.0, 90.0]]), "labels": torch.tensor([1]),
         "masks": torch.ones(1, 256, 256, dtype=torch.uint8)}])
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("name", DETECT)
def test_detectors_run_larger_canvases_at_native_scale_or_resized(name: str) -> None:
    from models._pyramid import set_input_size

    torch.manual_seed(0)
    model = build("detect", name, 3, 1, 64).eval()
    image = torch.rand(1, 128, 96)
    batch, _ = model.transform([image])  # native scale by default: the pixels as they come
    assert batch.image_sizes == [(128, 96)] and torch.equal(batch.tensors[0, :, :128, :96], image)
    set_input_size(model, 64)  # torchvision's resize: the longer side to 64
    assert model.transform([image])[0].image_sizes == [(64, 48)]
    with torch.no_grad():
        det = model([image])[0]
    assert (det["boxes"][:, 2] <= 96).all() and (det["boxes"][:, 3] <= 128).all()  # in the input's pixels
    assert set_input_size(model, None).transform([image])[0].image_sizes == [(128, 96)]
    with pytest.raises(TypeError, match="not a registry detector"):
        set_input_size(torch.nn.Linear(2, 2), None)


def test_extra_levels_stop_before_their_maps_vanish() -> None:
    from models._pyramid import level_strides

    model = build("detect", "fcos", 3, 1, 128, strides=[8, 16, 32, 64, 128], backbone_hparams={"depth": 10, "width": 8})
    assert level_strides(model.backbone, 128, 1) == [8, 16, 32, 64]  # stride 128 would leave a 1 px map
    losses = model.train()([torch.randn(1, 128, 128)], [
        {"boxes": torch.tensor([[10.0, 10.0, 110.0, 90.0]]), "labels": torch.tensor([1])}])
    assert all(torch.isfinite(v) for v in losses.values())
