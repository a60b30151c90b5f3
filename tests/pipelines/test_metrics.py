"""Metric meters on cases worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.metrics import COCO_CURVE, ClassifyMeter, DetectMeter, MetricReport, SegmentMeter, segment_report


def test_classify_metrics_match_a_hand_computed_confusion_matrix():
    # labels 0, 1, 2, 2; predictions 0, 2, 2, 1, each with confidence 0.8.
    labels = torch.tensor([0, 1, 2, 2])
    probs = torch.full((4, 3), 0.1)
    probs[torch.arange(4), torch.tensor([0, 2, 2, 1])] = 0.8
    meter = ClassifyMeter(["a", "b", "c"])
    meter.update(probs.log()[:2], labels[:2])  # two batches, as the engine feeds it
    meter.update(probs.log()[2:], labels[2:])
    report = meter.compute()
    assert report.confusion == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    assert report.scalars["accuracy"] == pytest.approx(0.5)
    assert report.scalars["top5"] == pytest.approx(1.0)  # top-3 of 3 classes
    # F1: a = 1, b = 0, c: precision 1/2, recall 1/2 -> 0.5; macro mean 0.5
    assert report.scalars["f1_macro"] == pytest.approx(0.5)
    # NLL: true class has p = 0.8 twice and 0.1 twice
    assert report.scalars["nll"] == pytest.approx(-(2 * math.log(0.8) + 2 * math.log(0.1)) / 4, rel=1e-5)
    # every confidence is 0.8 in one bin, accuracy 0.5: ECE = |0.8 - 0.5|
    assert report.scalars["ece"] == pytest.approx(0.3, abs=1e-5)
    assert report.per_class["accuracy"] == pytest.approx({"a": 1.0, "b": 0.0, "c": 0.5})
    assert {r["class"] for r in report.curves} == {"a", "b", "c"}
    assert report.flat("test_")["per_class/test_accuracy/c"] == pytest.approx(0.5)


def _box_mask(box: list[float], size: int = 64) -> torch.Tensor:
    mask = torch.zeros((size, size), dtype=torch.bool)
    x1, y1, x2, y2 = (int(v) for v in box)
    mask[y1:y2, x1:x2] = True
    return mask


def test_detection_ap_matches_coco_101_point_interpolation():
    gt = [[2.0, 2.0, 22.0, 22.0], [30.0, 30.0, 50.0, 50.0], [40.0, 2.0, 60.0, 20.0]]
    target = {"boxes": torch.tensor(gt), "labels": torch.tensor([0, 0, 1]),
              "masks": torch.stack([_box_mask(b) for b in gt])}
    # Class 0: a hit (0.9), then a false positive (0.8), one object missed -> precision 1 up to
    # recall 0.5, 0 after: AP = 51/101 at every IoU threshold. Class 1: one exact hit -> AP = 1.
    pred_boxes = [gt[0], [2.0, 40.0, 12.0, 60.0], gt[2]]
    pred = {"boxes": torch.tensor(pred_boxes), "scores": torch.tensor([0.9, 0.8, 0.7]),
            "labels": torch.tensor([0, 0, 1]), "masks": torch.stack([_box_mask(b) for b in pred_boxes])}
    meter = DetectMeter(["shirt", "bag"])
    meter.update([pred], [target])
    report = meter.compute()
    class0 = 51 / 101
    assert report.per_class["ap"] == pytest.approx({"shirt": class0, "bag": 1.0}, abs=1e-4)
    assert report.scalars["map"] == pytest.approx((class0 + 1) / 2, abs=1e-4)
    assert report.scalars["map_50"] == pytest.approx((class0 + 1) / 2, abs=1e-4)
    assert report.scalars["mask_map"] == pytest.approx((class0 + 1) / 2, abs=1e-4)  # masks fill the boxes
    assert report.per_class["mask_ap"]["bag"] == pytest.approx(1.0, abs=1e-4)
    assert report.curves[0] == {"class": COCO_CURVE, "recall": 0.0, "precision": 1.0}


def test_detection_without_masks_reports_box_map_only():
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([0])}
    pred = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "scores": torch.tensor([0.5]),
            "labels": torch.tensor([0])}
    meter = DetectMeter(["a", "b"])
    meter.update([pred], [target])
    report = meter.compute()
    assert report.scalars["map"] == pytest.approx(1.0) and "mask_map" not in report.scalars
    assert report.per_class["ap"]["b"] == -1.0  # a class without ground truth is not measured


def test_segmentation_iou_dice_and_pixel_accuracy_by_hand():
    # pixels (truth, prediction): (0, 0), (0, 1), (1, 1), (2, 1)
    truth = torch.tensor([[[0, 0], [1, 2]]])
    pred = torch.tensor([[[0, 1], [1, 1]]])
    meter = SegmentMeter(["a", "b", "c"])  # class "c" (index 3) never appears
    meter.update(pred, truth)
    report = meter.compute()
    assert report.confusion == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    iou = {"background": 1 / 2, "a": 1 / 3, "b": 0.0, "c": -1.0}
    assert report.per_class["iou"] == pytest.approx(iou)
    assert report.scalars["miou"] == pytest.approx((1 / 2 + 1 / 3 + 0) / 3)  # absent class left out
    assert report.scalars["pixel_accuracy"] == pytest.approx(0.5)
    assert report.scalars["dice"] == pytest.approx((0.5 + 0.0) / 2)  # foreground classes a, b


def test_ignored_truth_pixels_are_left_out_of_the_segment_metrics():
    """Truth pixels at IGNORE (255: a masks: dataset's void boundaries) count for nothing, whatever was predicted
    there; they made the confusion matrix's bincount overflow its K x K shape (the meter raised)."""
    from pipelines.scenes import IGNORE

    truth = torch.tensor([[[0, 0, IGNORE], [1, 2, IGNORE]]])
    pred = torch.tensor([[[0, 1, 2], [1, 1, 0]]])
    meter = SegmentMeter(["a", "b", "c"])
    meter.update(pred, truth)
    reference = SegmentMeter(["a", "b", "c"])
    reference.update(pred[:, :, :2], truth[:, :, :2])  # the same pixels, the ignored ones cut away
    assert meter.compute().confusion == reference.compute().confusion
    assert meter.compute().scalars == reference.compute().scalars


def test_perfect_segmentation_scores_one():
    masks = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    report = segment_report(torch.zeros((3, 3), dtype=torch.int64), ["bg", "x", "y"])
    assert report.scalars["miou"] == 0.0 and report.scalars["pixel_accuracy"] == 0.0
    meter = SegmentMeter(["x", "y"])
    meter.update(masks, masks)
    assert meter.compute().scalars == {"miou": 1.0, "pixel_accuracy": 1.0, "dice": 1.0}
    assert isinstance(meter.compute(), MetricReport)
