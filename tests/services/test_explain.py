"""Grad-CAM math (pipelines/explain.py) and POST /explain's conversions (services/explain.py), on tiny real nets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.explain import class_cams, detection_cams, detector_layers
from pipelines.tasks import ClassifyTask, DetectTask, SegmentTask
from services.errors import InputError
from services.explain import chosen_class, explained_task, on_client
from services.imaging import fit_square, letterbox


class CornerNet(nn.Module):
    """Two classes: 0 = bright pixels (channel 0), 1 = dark pixels (channel 1), averaged over the image."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(1, 2, 3, padding=1, bias=True)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1], conv.weight[1, 0, 1, 1] = 1.0, -1.0
            conv.bias[:] = torch.tensor([0.0, 1.0])
        self.features = nn.Sequential(conv, nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
        with torch.no_grad():
            self.head[2].weight.copy_(torch.eye(2))
            self.head[2].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def corner_image() -> torch.Tensor:
    image = torch.zeros(1, 1, 16, 16)
    image[0, 0, 1:6, 1:6] = 1.0  # the bright evidence sits in the top-left corner
    return image


def test_class_evidence_in_one_corner_puts_the_heat_there():
    heat, chosen, logits = class_cams(CornerNet(), corner_image(), torch.tensor([0]))
    assert heat.shape == (1, 16, 16) and float(heat.min()) >= 0 and float(heat.max()) == pytest.approx(1.0)
    assert int(chosen[0]) == 0 and logits.shape == (1, 2)
    assert float(heat[0, :8, :8].sum() / heat[0].sum()) > 0.9  # the top-left quadrant holds the heat


def test_the_other_class_looks_elsewhere_and_top_class_is_the_default():
    model = CornerNet()
    dark, _, _ = class_cams(model, corner_image(), torch.tensor([1]))
    assert float(dark[0, 1:6, 1:6].sum() / dark[0].sum()) < 0.05  # class 1 is the dark pixels: not the corner
    _, top, logits = class_cams(model, corner_image())
    assert int(top[0]) == int(logits.argmax(1)[0])


def test_training_reports_grad_cam_is_the_same_math_and_leaves_the_model_as_it_was():
    from pipelines.plots import grad_cam

    model = CornerNet().train()
    heat, top = grad_cam(model, corner_image())
    expected, chosen, _ = class_cams(model, corner_image())
    assert torch.equal(heat, expected) and torch.equal(top, chosen)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert not model.features._forward_hooks


def tiny_fcos() -> nn.Module:
    from models._registry import build

    torch.manual_seed(0)
    model = build(DetectTask.name, "fcos", 3, 1, 40)
    with torch.no_grad():  # an untrained FCOS scores ~0.05; lift every class so it returns boxes
        model.head.classification_head.cls_logits.bias.fill_(2.0)
    return model.eval()


def test_detection_cams_give_one_heatmap_per_chosen_box_and_touch_no_parameter():
    model = tiny_fcos()
    image = torch.zeros(1, 40, 40)
    image[:, 4:16, 4:16] = 2.0
    detections, heat = detection_cams(model, image, lambda found: list(range(min(3, len(found["scores"])))))
    assert len(detections["scores"]) >= 3 and heat.shape == (3, 40, 40)
    assert float(heat.min()) >= 0 and torch.allclose(heat.flatten(1).amax(1), torch.ones(3))
    assert all(p.grad is None for p in model.parameters())
    assert all(not layer._forward_hooks for layer in detector_layers(model)) and not model.transform._forward_hooks
    with torch.inference_mode():  # predictions afterwards are the plain model's
        assert torch.equal(model([image])[0]["scores"], detections["scores"])


def test_a_box_score_is_explained_near_the_box():
    """A detection's score comes from the head's maps around its own place (unpooled gradients)."""
    model = tiny_fcos()
    image = torch.zeros(1, 40, 40)
    image[:, 20:32, 20:32] = 2.0
    detections, heat = detection_cams(model, image, lambda found: [0])
    x0, y0, x1, y1 = detections["boxes"][0].tolist()
    rows, cols = torch.nonzero(heat[0] > 0.5, as_tuple=True)
    centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2
    assert float((cols.float() - centre_x).abs().max()) < 16 and float((rows.float() - centre_y).abs().max()) < 16


def test_heatmaps_go_back_to_the_client_pixels():
    array = np.zeros((20, 60, 1), np.uint8)  # wide: letterboxed to 40 x 13 + padding
    _, placement = letterbox(array, 40)
    heat = torch.zeros(40, 40)
    heat[:14, 20:] = 1.0  # the right half of the content
    client = on_client(heat, placement)
    assert client.shape == (20, 60)
    assert float(client[:, 35:].mean()) > 0.9 and float(client[:, :25].mean()) < 0.05
    _, cropped = fit_square(np.zeros((16, 32, 1), np.uint8), 16)  # centre crop: the cut sides stay 0
    client = on_client(torch.ones(16, 16), cropped)
    assert client.shape == (16, 32) and float(client[:, :6].max()) == 0.0 and float(client[:, 10:22].min()) == 1.0


class Runner:  # what chosen_class reads of a TaskRunner
    task, classes = ClassifyTask.name, ["cat", "dog"]


def test_bad_explain_options_are_422():
    assert explained_task({}) == ClassifyTask.name and explained_task({"task": DetectTask.name}) == DetectTask.name
    with pytest.raises(InputError, match="cannot be explained") as info:
        explained_task({"task": SegmentTask.name})
    assert info.value.status == 422
    assert chosen_class(Runner(), {}) is None
    assert chosen_class(Runner(), {"class_name": "dog"}) == 1 and chosen_class(Runner(), {"class_index": 0}) == 0
    for options, message in (({"class_name": "cow"}, "unknown class 'cow'"), ({"class_index": 2}, "not in 0..1"),
                             ({"class_name": "cat", "class_index": 0}, "not both")):
        with pytest.raises(InputError, match=message) as info:
            chosen_class(Runner(), options)
        assert info.value.status == 422
