"""What a user of the served detections sees (pipelines/metrics.py): one label per box, the score threshold
of maximum F1, and precision, recall and detections per object at it, on constructed boxes and scores."""

from __future__ import annotations

import pytest
import torch

from pipelines.metrics import (AGNOSTIC_IOU, COCO_CURVE, FALLBACK_THRESHOLD, SERVED_CURVE, DetectMeter,
                               choose_threshold, matched_detections, one_label_per_box, operating_point)

OBJECT_A, OBJECT_B = [2.0, 2.0, 20.0, 20.0], [30.0, 30.0, 50.0, 50.0]


def target() -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor([OBJECT_A, OBJECT_B]), "labels": torch.tensor([0, 1])}


def per_class_output() -> dict[str, torch.Tensor]:
    """What torchvision's per-class NMS leaves: object A under its label (0.9) and again under two others
    (0.8, 0.5), object B under its label (0.6) and once more under another (0.3)."""
    near_a = [[2.5, 2.0, 20.0, 20.5], [2.0, 2.5, 20.5, 20.0]]
    return {"boxes": torch.tensor([OBJECT_A, *near_a, OBJECT_B, [30.0, 30.5, 50.0, 50.0]]),
            "scores": torch.tensor([0.9, 0.8, 0.5, 0.6, 0.3]), "labels": torch.tensor([0, 2, 1, 1, 0])}


def test_one_label_per_box_keeps_each_objects_best_label_and_spares_overlapping_objects():
    out = per_class_output()
    assert one_label_per_box(out["boxes"], out["scores"]).tolist() == [0, 3]  # best first
    # two objects of different classes overlapping at IoU 0.5 are both kept
    half = torch.tensor([[0.0, 0.0, 30.0, 20.0], [10.0, 0.0, 40.0, 20.0]])
    assert AGNOSTIC_IOU > 0.5 and one_label_per_box(half, torch.tensor([0.4, 0.9])).tolist() == [1, 0]


def test_matching_counts_a_box_under_another_label_as_a_false_positive():
    scores, hits = matched_detections([per_class_output()], [target()])
    assert scores.tolist() == pytest.approx([0.9, 0.8, 0.6, 0.5, 0.3])  # best first
    assert hits.tolist() == [True, False, True, False, False]
    # an object is matched once: a second right-label box on it is a false positive
    twice = {"boxes": torch.tensor([OBJECT_A, OBJECT_A]), "scores": torch.tensor([0.7, 0.6]),
             "labels": torch.tensor([0, 0])}
    assert matched_detections([twice], [target()])[1].tolist() == [True, False]


def test_the_threshold_of_maximum_f1_lies_halfway_to_the_next_score():
    scores, hits = torch.tensor([0.9, 0.8, 0.6, 0.5, 0.3]), torch.tensor([True, False, True, False, False])
    # F1 = 2 TP / (kept + objects): 2/3, 2/4, 4/5, 4/6, 4/7 -> keep three, cut between 0.6 and 0.5
    assert choose_threshold(scores, hits, objects=2) == pytest.approx(0.55)
    # equal scores are kept or dropped together
    tied = torch.tensor([0.9, 0.7, 0.7]), torch.tensor([True, False, True])
    assert choose_threshold(*tied, objects=2) == pytest.approx(0.35)
    assert choose_threshold(torch.zeros(0), torch.zeros(0, dtype=torch.bool), 3) == FALLBACK_THRESHOLD


def test_precision_recall_and_detections_per_object_at_a_threshold():
    scores, hits = torch.tensor([0.9, 0.8, 0.6, 0.5, 0.3]), torch.tensor([True, False, True, False, False])
    at = operating_point(scores, hits, objects=2, threshold=0.55)
    assert at == pytest.approx({"score_threshold": 0.55, "precision": 2 / 3, "recall": 1.0, "f1": 0.8,
                                "detections_per_object": 1.5})
    assert operating_point(scores, hits, 2, 0.0)["detections_per_object"] == 2.5
    assert operating_point(scores, hits, 2, 0.95) == pytest.approx(
        {"score_threshold": 0.95, "precision": 0.0, "recall": 0.0, "f1": 0.0, "detections_per_object": 0.0})


def test_the_meter_serves_one_label_per_box_and_ranks_every_box_for_map():
    agnostic, per_class = DetectMeter(["a", "b", "c"]), DetectMeter(["a", "b", "c"], nms="per_class")
    for meter in (agnostic, per_class):
        meter.update([per_class_output()], [target()])
    served, every = agnostic.compute(), per_class.compute()
    assert served.scalars["map"] == every.scalars["map"]  # mAP ranks the model's own detections
    # agnostic: A (0.9) and B (0.6) only -> threshold between 0.6 and 0 -> precision 1, one detection per object
    assert served.scalars["detections_per_object"] == 1.0 and served.scalars["precision"] == 1.0
    assert served.scalars["score_threshold"] == pytest.approx(0.3)
    assert every.scalars["score_threshold"] == pytest.approx(0.55) and every.scalars["detections_per_object"] == 1.5
    assert {r["class"] for r in served.curves} == {COCO_CURVE, SERVED_CURVE}
    assert [r["threshold"] for r in served.curves if r["class"] == SERVED_CURVE] == pytest.approx([0.9, 0.6])


def test_a_given_threshold_is_used_not_chosen():
    meter = DetectMeter(["a", "b", "c"], score_threshold=0.95)
    meter.update([per_class_output()], [target()])
    scalars = meter.compute().scalars
    assert scalars["score_threshold"] == 0.95 and scalars["detections_per_object"] == 0.0


def test_an_unknown_nms_mode_is_refused():
    with pytest.raises(ValueError, match="nms 'soft'"):
        DetectMeter(["a"], nms="soft")
