"""The served detections' defaults: the model's stored score threshold (services/runners.py) and one label
per box unless a request asks for per-class NMS (services/results.py)."""

from __future__ import annotations

import numpy as np
import torch

from models import _checkpoint as checkpoint
from models._registry import build
from services.imaging import Placement
from services.results import detect_result
from services.runners import DEFAULT_SCORE_THRESHOLD, load_runner
from services.schemas import Options


def saved_detector(directory, **served) -> None:
    torch.manual_seed(0)
    model = build("detect", "fcos", 3, 1, 32)
    checkpoint.save(model, {"task": "detect", "family": "fcos", "hparams": {}, "num_classes": 3, "in_channels": 1,
                            "image_size": 32, "classes": ["a", "b", "c"], "mean": [0.3], "std": [0.2], **served},
                    directory)


def runner(directory):
    return load_runner("detect", directory, name="convforge-detect", version="1", backend="torch", max_batch_size=1,
                       max_latency_ms=1000)


def test_a_request_without_a_threshold_gets_the_models_own(tmp_path):
    saved_detector(tmp_path / "chosen", score_threshold=0.42)
    saved_detector(tmp_path / "older")
    request = Options().model_dump()  # what the service reads when a request sets no option
    assert runner(tmp_path / "chosen").options(request, 5).score_threshold == 0.42
    assert runner(tmp_path / "older").options(request, 5).score_threshold == DEFAULT_SCORE_THRESHOLD
    given = runner(tmp_path / "chosen").options({**request, "score_threshold": 0.0, "top_k": 2}, 5)
    assert (given.score_threshold, given.top_k) == (0.0, 2)  # 0 is a threshold, not "unset"


def test_one_label_per_box_unless_per_class_is_asked():
    # torchvision labels (class + 1): object 1 under three labels, object 2 under one
    output = {"boxes": np.array([[2, 2, 20, 20], [2.5, 2, 20, 20.5], [2, 2.5, 20.5, 20], [30, 30, 40, 40]], np.float32),
              "labels": np.array([1, 2, 3, 2]), "scores": np.array([0.5, 0.9, 0.3, 0.6], np.float32)}
    placement = Placement(64, 64, 1.0, 1.0)
    one = detect_result(0, output, ["a", "b", "c"], Options(score_threshold=0.1), placement).detections
    assert [(d.label, d.score) for d in one] == [("b", np.float32(0.9)), ("b", np.float32(0.6))]
    every = detect_result(0, output, ["a", "b", "c"], Options(score_threshold=0.1, nms="per_class"),
                          placement).detections
    assert [d.label for d in every] == ["b", "b", "a", "c"]
    capped = detect_result(0, output, ["a", "b", "c"], Options(score_threshold=0.0, max_detections=1), placement)
    assert len(capped.detections) == 1


def test_mask_format_applies_only_to_detectors_with_a_mask_head(tmp_path):
    """Faster R-CNN (and FCOS) answer boxes only: their answers echo no mask_format, and a request that asks for
    one is a 400 naming it; Mask R-CNN's masks come as png unless asked otherwise."""
    import pytest

    from services.endpoints import response
    from services.errors import InputError

    served = {}
    for family in ("faster_rcnn", "mask_rcnn"):
        torch.manual_seed(0)
        checkpoint.save(build("detect", family, 3, 1, 32), {
            "task": "detect", "family": family, "hparams": {}, "num_classes": 3, "in_channels": 1, "image_size": 32,
            "classes": ["a", "b", "c"], "mean": [0.3], "std": [0.2]}, tmp_path / family)
        served[family] = runner(tmp_path / family)
    request = Options().model_dump()
    boxes = served["faster_rcnn"].options(request, 5)
    echoed = response("detect", served["faster_rcnn"].card, boxes, []).model_dump(exclude_none=True)
    assert boxes.mask_format is None and echoed["box_format"] == "xyxy" and "mask_format" not in echoed
    with pytest.raises(InputError, match="mask_format: the served detect model .faster_rcnn. answers boxes only") \
            as refused:
        served["faster_rcnn"].options({**request, "mask_format": "rle"}, 5)
    assert refused.value.status == 400
    assert served["mask_rcnn"].options(request, 5).mask_format == "png"
    assert served["mask_rcnn"].options({**request, "mask_format": "rle"}, 5).mask_format == "rle"
