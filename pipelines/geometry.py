"""Detector geometry from the training boxes: pyramid strides, anchor scales and aspect ratios, and FCOS's
per-level size ranges, chosen so they cover the 5th-95th percentile of the boxes' sizes.

The way YOLOv5's autoanchor does it (Jocher et al. 2020, ultralytics/yolov5 `utils/autoanchor.py`):
measure how well the default geometry fits the training boxes (best possible recall: the share of
boxes some anchor matches) and keep it when it fits (>= 0.98); else fit a new one to the boxes,
sizes from the percentiles of sqrt(w h) and aspect ratios by k-means (Redmon & Farhadi 2017,
"YOLO9000", Sec. 2: anchor shapes clustered from the data). A box matches an anchor when their IoU,
both centred, is >= 0.5 (YOLOv5 compares w/h ratios instead; an IoU suits the IoU-matching RPN).

The pyramid (Lin et al. 2017, "Feature Pyramid Networks") gets one level per octave of box size:
Faster/Mask R-CNN anchors of (c, 1.5c) x stride at every level (Ren et al. 2015, Sec. 3.1.1; c = 2
as today) make a chain of sizes no more than 1.5x apart from the 5th to the 95th percentile. FCOS
(Tian et al. 2019, Sec. 3.2) gives a level of anchor size a the boxes whose largest centre-to-side
distance is in [4a, 8a), i.e. sides of about [8a, 16a); the finest level starts at the 5th percentile.

The result is a set of detector hparams (`strides`, `anchor_scales`, `aspect_ratios`, `anchor_scale`):
each family takes the ones its builder has, the model's config.json records them, and serving
rebuilds the same geometry from that config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

PERCENTILES = (5.0, 95.0)
MIN_STRIDE, MAX_STRIDE = 4, 128  # the finest stage every backbone has; its stride 32 + two extra levels
SCALE_STEP = 1.5  # ratio between an anchor size and the next one up the chain
MATCH_IOU = 0.5  # a box counts as covered by an anchor of at least this centred IoU
KEEP_RECALL = 0.98  # YOLOv5 keeps its anchors when their best possible recall exceeds this
MIN_SIDE = 2.0  # boxes smaller than this (px) are ignored, as YOLOv5 does
RECALL_SAMPLE = 20_000  # boxes the recall is measured on (a seeded sample of larger sets)


@dataclass(frozen=True)
class Geometry:
    """A detector's geometry as hparams: pyramid `strides`; R-CNN anchors of `anchor_scales` x stride at
    `aspect_ratios` (h / w) on every level; FCOS anchor size `anchor_scale` x stride per level."""

    strides: tuple[int, ...] = (4, 8, 16)
    anchor_scales: tuple[float, ...] = (2.0, 3.0)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_scale: float = 0.5

    def anchor_sizes(self) -> list[tuple[float, ...]]:
        """The R-CNN anchor sizes (sqrt of area, px) of each level."""
        return [tuple(k * s for k in self.anchor_scales) for s in self.strides]

    def fcos_ranges(self) -> list[tuple[float, float]]:
        """Each FCOS level's nominal box sides (px), [8a, 16a); the finest also takes all below, the
        coarsest all above."""
        return [(8 * self.anchor_scale * s, 16 * self.anchor_scale * s) for s in self.strides]

    def hparams(self) -> dict[str, Any]:
        """The geometry as detector hparams, in JSON's types (lists), as config.json records them."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


DEFAULT = Geometry()  # the registry's defaults: 8-48 px anchors at strides 4-16


@dataclass(frozen=True)
class BoxStats:
    """The sizes sqrt(w h) and aspect ratios h / w of a split's boxes (px)."""

    sizes: np.ndarray
    ratios: np.ndarray

    @property
    def low(self) -> float:
        return float(np.percentile(self.sizes, PERCENTILES[0]))

    @property
    def high(self) -> float:
        return float(np.percentile(self.sizes, PERCENTILES[1]))


def box_stats(boxes: np.ndarray) -> BoxStats:
    """Sizes and aspect ratios of xyxy boxes [N, 4]; boxes under MIN_SIDE px on a side are left out."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (w >= MIN_SIDE) & (h >= MIN_SIDE)
    return BoxStats(np.sqrt(w[keep] * h[keep]), h[keep] / w[keep])


def split_boxes(data: Any) -> np.ndarray:
    """Every xyxy box [N, 4] of a scene split; lazily read splits give them from their COCO
    annotations, without decoding a mask."""
    annotations = getattr(data.targets, "annotations", None)
    if annotations is not None:
        rows = [[x, y, x + w, y + h] for anns in annotations for x, y, w, h in (a["bbox"] for a in anns)]
        return np.asarray(rows, dtype=np.float64).reshape(-1, 4)
    boxes = [np.asarray(target["boxes"], dtype=np.float64).reshape(-1, 4) for target in data.targets]
    return np.concatenate(boxes) if boxes else np.zeros((0, 4))


def best_possible_recall(stats: BoxStats, geometry: Geometry) -> float:
    """The share of boxes whose best R-CNN anchor (centred on the box) has IoU >= MATCH_IOU."""
    if len(stats.sizes) == 0:
        return 1.0
    pick = np.random.default_rng(0).permutation(len(stats.sizes))[:RECALL_SAMPLE]
    sizes, ratios = stats.sizes[pick], stats.ratios[pick]
    w, h = (sizes / np.sqrt(ratios))[:, None], (sizes * np.sqrt(ratios))[:, None]
    anchors = np.array([(a / math.sqrt(r), a * math.sqrt(r)) for level in geometry.anchor_sizes()
                        for a in level for r in geometry.aspect_ratios])
    inter = np.minimum(w, anchors[:, 0]) * np.minimum(h, anchors[:, 1])
    iou = inter / (w * h + anchors[:, 0] * anchors[:, 1] - inter)
    return float((iou.max(1) >= MATCH_IOU).mean())


def _pow2(value: float, up: bool) -> int:
    exponent = math.ceil(math.log2(value)) if up else math.floor(math.log2(value))
    return 2 ** max(0, exponent)


def fit_anchors(low: float, high: float) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Strides (one level per octave) and anchor scales whose sizes chain from <= `low` to >= `high`.

    Scales (c, 1.5c) with c = 2 put the anchors 1.5x or 1.33x apart; c shrinks for boxes finer than
    2 x MIN_STRIDE, and the chain grows past 1.5c where the boxes outgrow MAX_STRIDE's anchors.
    """
    base = min(DEFAULT.anchor_scales[0], max(1.0, low / MIN_STRIDE))
    finest = min(max(_pow2(low / base, up=False), MIN_STRIDE), MAX_STRIDE // 2)
    coarsest = min(max(_pow2(high / (SCALE_STEP * base), up=True), 2 * finest), MAX_STRIDE)
    count = 2 + max(0, math.ceil(math.log(high / (SCALE_STEP * base * coarsest)) / math.log(SCALE_STEP) - 1e-9))
    strides = tuple(2 ** k for k in range(int(math.log2(finest)), int(math.log2(coarsest)) + 1))
    return strides, tuple(round(base * SCALE_STEP ** j, 3) for j in range(count))


def fit_aspect_ratios(ratios: np.ndarray, k: int = 3, iterations: int = 30) -> tuple[float, ...]:
    """`k` aspect ratios (h / w) by 1-D k-means of log ratios, seeded at their quantiles (YOLO9000's
    anchor clustering, in log space so 1:2 and 2:1 are as far from 1:1); rounded, sorted, distinct."""
    if len(ratios) == 0:
        return DEFAULT.aspect_ratios
    logs = np.log(ratios)
    centres = np.quantile(logs, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        nearest = np.abs(logs[:, None] - centres[None]).argmin(1)
        centres = np.array([logs[nearest == j].mean() for j in range(len(centres)) if (nearest == j).any()])
    return tuple(sorted({round(float(np.exp(c)), 2) for c in centres}))


def fit_fcos_scale(low: float, high: float, strides: tuple[int, ...]) -> float:
    """FCOS's anchor size per stride: the finest level's range [8a, 16a) starts near the 5th percentile, or
    higher where the levels must stretch so the coarsest one's reaches the 95th; a is an even number of px
    (torchvision rounds anchor corners to whole pixels) and at least 2."""
    octaves = strides[-1] / strides[0]
    size = max(2, 2 * round(max(low / 8, high / (16 * octaves)) / 2))
    if 16 * size * octaves < high:
        size += 2
    return size / strides[0]


def derive_geometry(boxes: np.ndarray) -> Geometry:
    """The geometry for a training split's xyxy boxes [N, 4]: DEFAULT when it covers them (best possible
    recall >= KEEP_RECALL), else one fitted to their 5th-95th percentile of sizes and their aspect ratios."""
    stats = box_stats(boxes)
    if len(stats.sizes) == 0 or best_possible_recall(stats, DEFAULT) >= KEEP_RECALL:
        return DEFAULT
    low, high = stats.low, max(stats.high, stats.low)
    strides, scales = fit_anchors(low, high)
    return Geometry(strides, scales, fit_aspect_ratios(stats.ratios), fit_fcos_scale(low, high, strides))


def data_geometry(data: Any) -> dict[str, Any]:
    """Every geometry hparam derived from a training split's boxes; {} for data without boxes."""
    if hasattr(data, "target_stats"):  # regression data: its targets' standardisation (pipelines/regression.py)
        return data.target_stats()
    return derive_geometry(split_boxes(data)).hparams() if hasattr(data, "targets") else {}


def family_geometry(geometry: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The part of `geometry` a family takes (the hparams among its `defaults`)."""
    return {key: value for key, value in geometry.items() if key in defaults}


def geometry_hparams(defaults: dict[str, Any], data: Any) -> dict[str, Any]:
    """The data-derived geometry hparams a family takes (those among its `defaults`), from a training split;
    {} for families without geometry hparams and for data without boxes."""
    if not set(DEFAULT.hparams()) & set(defaults) and not hasattr(data, "target_stats"):
        return {}
    return family_geometry(data_geometry(data), defaults)
