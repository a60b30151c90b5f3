"""Evaluation metrics per task, accumulated batch by batch with torchmetrics (pycocotools for COCO mAP).

A meter is fed predictions and targets with `update(...)` and gives a `MetricReport`:
scalars (what the engine logs per epoch), per-class values, a confusion matrix and PR
curve records (what the evaluate stage plots).
- classify: top-1, top-5, macro F1, NLL, expected calibration error (15 bins, Guo et al. 2017),
  per-class accuracy, confusion matrix, one-vs-rest PR curves.
- detect: COCO mAP@[.5:.95], mAP@.5, mAP@.75, mAR@100, per-class AP, mask mAP when the model
  gives instance masks; precision, recall, F1 and detections per object at the score threshold
  (chosen on val at max F1); PR curves at IoU .5 (COCO's, and the served detections' over thresholds).
- segment: mIoU, per-class IoU, pixel accuracy and Dice from one pixel confusion matrix.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipelines.scenes import IGNORE


PER_CLASS = "per_class"  # the prefix of per-class metric names


@dataclass
class MetricReport:
    """What a meter computed: scalars, per-class values, confusion matrix, PR curve records."""

    scalars: dict[str, float]
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    confusion: list[list[int]] | None = None
    curves: list[dict[str, Any]] = field(default_factory=list)
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # more plot data: {JSON file stem: rows}

    def flat(self, prefix: str = "") -> dict[str, float]:
        """Scalars and per-class values in one flat dict: `<prefix><metric>` and
        `per_class/<prefix><metric>/<class>` (MLflow's UI folds a `per_class/` prefix into one section)."""
        out = {f"{prefix}{name}": value for name, value in self.scalars.items()}
        for metric, values in self.per_class.items():
            out.update({f"{PER_CLASS}/{prefix}{metric}/{key_part(name)}": value for name, value in values.items()})
        return out


def key_part(name: str) -> str:
    """A class name usable inside a metric key (MLflow allows letters, digits, `_-. `)."""
    return re.sub(r"[^\w.\- ]", "_", name)


def _finite(value: float) -> float:
    """NaN (e.g. a class absent from the split) becomes -1, COCO's and torchmetrics' "not measured"."""
    return value if math.isfinite(value) else -1.0


class ClassifyMeter:
    """Accuracy, top-5, macro F1, NLL, ECE, per-class accuracy and confusion matrix from logits."""

    def __init__(self, classes: Sequence[str], curve_points: int = 50):
        from torchmetrics.classification import (MulticlassAccuracy, MulticlassCalibrationError,
                                                 MulticlassConfusionMatrix, MulticlassF1Score,
                                                 MulticlassPrecisionRecallCurve)

        self.classes = list(classes)
        n = len(self.classes)
        self.metrics = {
            "accuracy": MulticlassAccuracy(n, average="micro"),
            "top5": MulticlassAccuracy(n, top_k=min(5, n), average="micro"),
            "f1_macro": MulticlassF1Score(n, average="macro"),
            "ece": MulticlassCalibrationError(n, n_bins=15, norm="l1"),
        }
        self.per_class_accuracy = MulticlassAccuracy(n, average="none")
        self.confusion = MulticlassConfusionMatrix(n)
        # Exact curves (thresholds=None): the binned variant falls back to a very slow bincount
        # under torch.use_deterministic_algorithms.
        self.pr_curve = MulticlassPrecisionRecallCurve(n, thresholds=None)
        self.curve_points = curve_points
        self.nll_sum, self.count = 0.0, 0

    def update(self, logits: Tensor, labels: Tensor) -> None:
        """Add a batch: logits [N, C] (any device), labels int64 [N]."""
        logits, labels = logits.detach().float().cpu(), labels.cpu()
        probs = logits.softmax(1)
        for metric in (*self.metrics.values(), self.per_class_accuracy, self.confusion):
            metric.update(probs, labels)
        self.pr_curve.update(probs, labels)
        self.nll_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        self.count += int(labels.numel())

    def compute(self) -> MetricReport:
        scalars = {name: float(metric.compute()) for name, metric in self.metrics.items()}
        scalars["nll"] = self.nll_sum / max(1, self.count)
        per_class = {"accuracy": {c: _finite(float(v)) for c, v in
                                  zip(self.classes, self.per_class_accuracy.compute())}}
        precision, recall, _ = self.pr_curve.compute()
        curves = []
        for name, p_class, r_class in zip(self.classes, precision, recall):
            keep = torch.linspace(0, len(p_class) - 1, min(len(p_class), self.curve_points)).round().long().unique()
            curves += [{"class": name, "recall": round(float(r), 6), "precision": round(float(p), 6)}
                       for p, r in zip(p_class[keep].tolist(), r_class[keep].tolist())]
        return MetricReport(scalars, per_class, self.confusion.compute().tolist(), curves)


class DetectMeter:
    """COCO mAP (boxes, and instance masks when predictions carry them) via torchmetrics' pycocotools backend,
    and what a user of the served detections sees at one score threshold (`operating_point`).

    Predictions and targets use class indices 0..C-1 (the engine subtracts torchvision's +1). mAP ranks
    every detection the model gives (torchvision's per-class NMS, as COCO scores); the served ones are
    those of one label per box (`nms` agnostic, the service's default) scored >= `score_threshold`. With
    `score_threshold` None the meter chooses it (max F1, `choose_threshold`), as training does on val;
    evaluate passes the model's stored one.
    """

    def __init__(self, classes: Sequence[str], score_threshold: float | None = None, nms: str = "agnostic"):
        if nms not in NMS_MODES:
            raise ValueError(f"nms {nms!r}: expected one of {', '.join(NMS_MODES)}")
        self.classes = list(classes)
        self.score_threshold, self.nms = score_threshold, nms
        self.preds: list[dict[str, Tensor]] = []
        self.targets: list[dict[str, Tensor]] = []

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        """Add a batch: preds {"boxes" xyxy, "scores", "labels"[, "masks" bool [k, H, W]]}, targets alike."""
        for pred, target in zip(preds, targets):
            self.preds.append({k: v.detach().cpu() for k, v in pred.items()})
            self.targets.append({k: v.detach().cpu() for k, v in target.items() if k in ("boxes", "labels", "masks")})

    def compute(self) -> MetricReport:
        from torchmetrics.detection import MeanAveragePrecision

        with_masks = bool(self.preds) and all("masks" in p for p in self.preds)
        iou_types = ("bbox", "segm") if with_masks else ("bbox",)
        metric = MeanAveragePrecision(iou_type=iou_types, class_metrics=True, extended_summary=True,
                                      backend="pycocotools")
        preds = [{**p, "masks": p["masks"].bool()} if with_masks else
                 {k: v for k, v in p.items() if k != "masks"} for p in self.preds]
        targets = [{**t, "masks": t["masks"].bool()} if with_masks else
                   {k: v for k, v in t.items() if k != "masks"} for t in self.targets]
        metric.update(preds, targets)
        result = metric.compute()
        prefix = {"bbox": "", "segm": "mask_"}
        scalars: dict[str, float] = {}
        per_class: dict[str, dict[str, float]] = {}
        for iou_type in iou_types:
            key = f"{iou_type}_" if with_masks else ""
            for name in ("map", "map_50", "map_75", "mar_100"):
                scalars[prefix[iou_type] + name] = float(result[key + name])
            observed = result["classes"].reshape(-1).tolist()
            ap = result[key + "map_per_class"].reshape(-1).tolist()
            values = {self.classes[int(c)]: float(v) for c, v in zip(observed, ap) if 0 <= int(c) < len(self.classes)}
            per_class[prefix[iou_type] + "ap"] = {c: values.get(c, -1.0) for c in self.classes}
        served = [p if self.nms == "per_class" else
                  {k: v[one_label_per_box(p["boxes"], p["scores"])] for k, v in p.items()} for p in self.preds]
        scores, hits = matched_detections(served, self.targets)
        objects = sum(len(t["labels"]) for t in self.targets)
        threshold = choose_threshold(scores, hits, objects) if self.score_threshold is None else self.score_threshold
        scalars.update(operating_point(scores, hits, objects, threshold))
        curves = self._pr_curve(result, "bbox_" if with_masks else "") + threshold_curve(scores, hits, objects)
        return MetricReport(scalars, per_class, None, curves)

    @staticmethod
    def _pr_curve(result: dict[str, Any], key: str) -> list[dict[str, Any]]:
        """COCO's interpolated precision at IoU .5 over 101 recall levels, mean over classes (area all, 100 dets)."""
        precision = result.get(key + "precision")
        if precision is None or precision.numel() == 0:
            return []
        at_50 = precision[0, :, :, 0, -1]  # [R, K]; -1 marks classes without ground truth
        recalls = torch.linspace(0, 1, at_50.shape[0])
        records = []
        for r, row in zip(recalls.tolist(), at_50):
            valid = row[row > -1]
            records.append({"class": COCO_CURVE, "recall": round(r, 4),
                            "precision": round(float(valid.mean()), 6) if len(valid) else 0.0})
        return records


# How the service suppresses overlapping boxes after the model's per-class NMS (services/results.py): `agnostic`
# keeps the best label of boxes that overlap across classes too (one label per box), `per_class` nothing more.
NMS_MODES = ("agnostic", "per_class")
# Boxes of two classes overlapping at IoU >= this are one object seen twice: the same object under other
# labels overlaps at IoU ~0.9; 0.7 spares distinct objects that overlap (a rider and a horse).
AGNOSTIC_IOU = 0.7


def one_label_per_box(boxes: Tensor, scores: Tensor, iou: float = AGNOSTIC_IOU) -> Tensor:
    """Class-agnostic NMS: the indices of the detections kept, best first; of boxes overlapping at
    IoU >= `iou`, whatever their labels, the best scored stays."""
    from torchvision.ops import nms

    return nms(boxes.float(), scores.float(), iou)


# Detections as served: a detection is right when it overlaps an unmatched true box of its class at
# IoU >= MATCH_IOU, matched best score first (the COCO / PASCAL VOC rule, Everingham et al. 2010).
MATCH_IOU = 0.5
FALLBACK_THRESHOLD = 0.5  # chosen when a split has no detections or no objects to choose on
# The scalars a meter chooses on val that the model keeps in its config.json: the service's defaults
SERVED_SETTINGS = ("score_threshold",)
COCO_CURVE = "COCO mAP@0.5 (mean of classes)"
SERVED_CURVE = "detections above a score threshold"


def matched_detections(preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]],
                       iou: float = MATCH_IOU) -> tuple[Tensor, Tensor]:
    """Every detection's score and whether it is a true positive (bool), over all images."""
    from torchvision.ops import box_iou

    scores, hits = [], []
    for pred, target in zip(preds, targets):
        order = pred["scores"].argsort(descending=True, stable=True)
        hit = torch.zeros(len(order), dtype=torch.bool)
        if len(order) and len(target["boxes"]):
            overlaps = box_iou(pred["boxes"][order].float(), target["boxes"].float())
            overlaps[pred["labels"][order][:, None] != target["labels"][None, :]] = -1.0
            free = torch.ones(overlaps.shape[1], dtype=torch.bool)
            for i, row in enumerate(overlaps):
                best = torch.where(free, row, torch.full_like(row, -1.0)).argmax()
                if row[best] >= iou and free[best]:
                    hit[i], free[best] = True, False
        scores.append(pred["scores"][order].float())
        hits.append(hit)
    if not scores:
        return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    return torch.cat(scores), torch.cat(hits)


def _sweep(scores: Tensor, hits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(distinct scores high to low, true positives kept, detections kept) when keeping scores >= each."""
    order = scores.argsort(descending=True, stable=True)
    ranked, true = scores[order], hits[order].long().cumsum(0)
    last = torch.ones(len(ranked), dtype=torch.bool)  # the last of each run of equal scores
    last[:-1] = ranked[:-1] != ranked[1:]
    kept = torch.arange(1, len(ranked) + 1)
    return ranked[last], true[last], kept[last]


def choose_threshold(scores: Tensor, hits: Tensor, objects: int) -> float:
    """The score threshold of maximum F1 (2 TP / (detections + objects)); halfway to the next lower score,
    so the choice does not rest on one detection's exact score."""
    distinct, true, kept = _sweep(scores, hits)
    if not len(distinct) or objects == 0:
        return FALLBACK_THRESHOLD
    best = int((2 * true / (kept + objects)).argmax())  # the first maximum: the highest threshold
    below = float(distinct[best + 1]) if best + 1 < len(distinct) else 0.0
    return round((float(distinct[best]) + below) / 2, 6)


def operating_point(scores: Tensor, hits: Tensor, objects: int, threshold: float) -> dict[str, float]:
    """Precision, recall, F1 and detections per true object of the detections scored >= `threshold`
    (precision 0 when none are kept)."""
    kept = scores >= threshold
    count, true = int(kept.sum()), int(hits[kept].sum())
    precision, recall = true / count if count else 0.0, true / objects if objects else 0.0
    return {"score_threshold": float(threshold), "precision": precision, "recall": recall,
            "f1": 2 * true / (count + objects) if count + objects else 0.0,
            "detections_per_object": count / objects if objects else 0.0}


def threshold_curve(scores: Tensor, hits: Tensor, objects: int, points: int = 101) -> list[dict[str, Any]]:
    """Precision and recall of the detections scored >= t, for `points` thresholds t spread over the scores."""
    distinct, true, kept = _sweep(scores, hits)
    if not len(distinct) or objects == 0:
        return []
    keep = torch.linspace(0, len(distinct) - 1, min(len(distinct), points)).round().long().unique()
    return [{"class": SERVED_CURVE, "threshold": round(float(distinct[i]), 6),
             "recall": round(int(true[i]) / objects, 6), "precision": round(int(true[i]) / int(kept[i]), 6)}
            for i in keep.tolist()]


class SegmentMeter:
    """mIoU, per-class IoU, pixel accuracy and Dice from a pixel confusion matrix (C + 1 classes, 0 = background)."""

    def __init__(self, classes: Sequence[str]):
        self.names = ["background", *classes]
        self.confusion = torch.zeros((len(self.names), len(self.names)), dtype=torch.int64)

    def update(self, pred_masks: Tensor, target_masks: Tensor) -> None:
        """Add a batch: predicted and true class-index masks [N, H, W] (0 = background, c + 1 = class c; true
        pixels at IGNORE are left out)."""
        # A CPU bincount: torchmetrics' confusion matrix takes a far slower path under
        # torch.use_deterministic_algorithms (BENCHMARKS.md), and CPU bincount is deterministic anyway.
        k = len(self.names)
        truth, pred = target_masks.reshape(-1).cpu().long(), pred_masks.detach().reshape(-1).cpu().long()
        kept = truth != IGNORE
        pairs = truth[kept] * k + pred[kept]
        self.confusion += torch.bincount(pairs, minlength=k * k).reshape(k, k)

    def compute(self) -> MetricReport:
        return segment_report(self.confusion, self.names)


def segment_report(confusion: Tensor, names: Sequence[str]) -> MetricReport:
    """Segmentation metrics from a confusion matrix [K, K] (rows = truth, columns = prediction).

    A class neither present nor predicted has no IoU (NaN) and is left out of the means, as in
    the PASCAL VOC / mmsegmentation convention; mIoU counts background (VOC), Dice averages the
    foreground classes only.
    """
    confusion = confusion.double()
    tp = confusion.diag()
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    union = tp + fp + fn
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    dice = torch.where(union > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.full_like(tp, float("nan")))
    total = confusion.sum()
    scalars = {
        "miou": float(iou.nanmean()) if bool((union > 0).any()) else 0.0,
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "dice": float(dice[1:].nanmean()) if bool((union[1:] > 0).any()) else 0.0,
    }
    per_class = {"iou": {n: _finite(float(v)) for n, v in zip(names, iou)},
                 "dice": {n: _finite(float(v)) for n, v in zip(names, dice)}}
    return MetricReport(scalars, per_class, confusion.long().tolist(), [])
