"""The one versioned request/response schema of /classify, /detect and /segment, and its conversions.

Boxes leave in `box_format` (xyxy | xywh | normalized xyxy in [0, 1]); masks in
`mask_format`: png (base64 PNG, pixel = class index + 1, 0 = background), rle (COCO
RLE with `counts` as str, pycocotools), polygon (contours at 0.5 as [x0, y0, x1, y1, ...]
in pixel-centre coordinates, contourpy) or none. Masks as JSON arrays are what makes
other servers slow, so there is no array format.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from pipelines.metrics import NMS_MODES
from pipelines.tasks import TASKS

# major.minor: a minor version only adds fields, so clients of 1 keep working (1.1: in_domain, reason;
# 1.2: explanation, the /explain heatmaps; 1.3: values and names of /regress, image and psnr of /reconstruct).
SCHEMA_VERSION = "1.3"
TaskName = Literal[tuple(TASKS)]  # one value per task of pipelines/tasks.py
BoxFormat = Literal["xyxy", "xywh", "normalized"]
MaskFormat = Literal["png", "rle", "polygon", "none"]
NmsMode = Literal[NMS_MODES]  # pipelines/metrics.py: what evaluate measures is what is served


class Options(BaseModel):
    """Per-request options shared by the endpoints (each endpoint uses the ones that apply). Strict: `true` is no
    integer, `"3"` no number, and NaN no score."""

    model_config = ConfigDict(extra="forbid", strict=True)

    top_k: int | None = Field(None, ge=1, le=1000, description="classify: labels per image (default serve.top_k)")
    score_threshold: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False,
                                          description="detect: drop detections scored below this (default: the "
                                                      "model's, chosen on val at max F1)")
    max_detections: int = Field(100, ge=1, le=1000, description="detect: keep at most this many per image")
    nms: NmsMode = Field("agnostic", description="detect: agnostic keeps one label per "
                                                  "box (the best), per_class a box per class the model found")
    box_format: BoxFormat = Field("xyxy", description="detect: xyxy | xywh pixels, or xyxy normalized to [0, 1]")
    mask_format: MaskFormat | None = Field(None, description="segment class mask and detect instance masks (default "
                                                             "png; detect: models with a mask head only)")
    task: TaskName | None = Field(None, description="explain: the served model to explain (default classify)")
    class_name: str | None = Field(None, max_length=256, description="explain, classify: the class to explain "
                                                                     "(default: the top class)")
    class_index: int | None = Field(None, ge=0, description="explain, classify: the class to explain, by index")
    # reconstruct: the clean images to score the restored ones against, as read by the request reader and
    # decoded by the reconstruct api (services/payloads.py documents them); never a JSON option of their own
    targets: SkipJsonSchema[list[Any] | None] = Field(None, exclude=True)


class JsonRequest(Options):
    """JSON body: base64 images (a `data:image/...;base64,` prefix is allowed) plus options."""

    images: list[str] | None = Field(None, min_length=1, description="base64-encoded image files (PNG, JPEG, ...)")
    image: str | None = Field(None, description="one base64 image: shorthand for images: [image]")
    targets: list[str] | None = Field(None, min_length=1, description="reconstruct: base64 clean images, one per "
                                                                      "image, to answer the PSNR of each")

    @model_validator(mode="after")
    def _one_source(self) -> "JsonRequest":
        if (self.images is None) == (self.image is None):
            raise ValueError("send either 'images' (a list) or 'image', not both or neither")
        return self

    def image_list(self) -> list[str]:
        return self.images if self.images is not None else [self.image or ""]


class Mask(BaseModel):
    """One mask in `format`; `size` is [height, width] in the client image's pixels."""

    format: Literal["png", "rle", "polygon"]
    size: list[int]
    png: str | None = Field(None, description="base64 PNG; class mask pixel = class index + 1, instance mask 0/1")
    counts: str | None = Field(None, description="COCO RLE counts (column-major), pycocotools' string form")
    polygons: list[list[float]] | None = Field(None, description="outlines as [x0, y0, x1, y1, ...] per part")


class LabelScore(BaseModel):
    class_index: int
    label: str
    score: float


class Detection(BaseModel):
    box: list[float] = Field(..., description="in the request's box_format, in the input image's own pixels")
    class_index: int
    label: str
    score: float
    mask: Mask | None = None


class Heatmap(BaseModel):
    """One Grad-CAM heatmap: what it explains and where in the image that comes from (1 = most)."""

    class_index: int
    label: str
    score: float = Field(..., description="classify: the class probability; detect: the detection's score")
    box: list[float] | None = Field(None, description="detect: the explained detection's box, as in `detections`")
    heatmap_png: str = Field(..., description="base64 8-bit grey PNG at the image's own size, 255 = peak")
    heatmap: list[list[float]] = Field(..., description="the heatmap at low resolution (at most 32 x 32, rows "
                                                        "first, the image's aspect ratio), values in [0, 1]")


class Explanation(BaseModel):
    """POST /explain's answer for one image: one heatmap (classify) or one per returned detection (detect)."""

    method: str = Field(..., description="how the heatmaps were computed")
    heatmaps: list[Heatmap]


class ImageResult(BaseModel):
    """What one input image gave; fields of the other tasks stay null."""

    index: int
    width: int
    height: int
    labels: list[LabelScore] | None = None
    detections: list[Detection] | None = None
    mask: Mask | None = None
    class_pixels: dict[str, int] | None = None
    class_masks: dict[str, Mask] | None = Field(None, description="segment with rle/polygon: "
                                                                  "one mask per class present")
    in_domain: bool | None = Field(None, description="whether the image looks like the model's training data "
                                                     "(channels, size, mean intensity); since schema 1.1")
    reason: str | None = Field(None, description="why the image is out of domain (rules joined by '; ')")
    explanation: Explanation | None = Field(None, description="POST /explain only: Grad-CAM heatmaps")
    values: list[float] | None = Field(None, description="regress: the predicted targets, in their units; since 1.3")
    names: list[str] | None = Field(None, description="regress: the name of each value (e.g. angle, in degrees)")
    image: str | None = Field(None, description="reconstruct: the restored image, base64 PNG at the input's size; "
                                                 "since 1.3")
    psnr: float | None = Field(None, description="reconstruct: PSNR (dB) of the restored image against the "
                                                 "request's `targets` image, when sent")


class ModelInfo(BaseModel):
    task: str
    family: str
    name: str
    version: str


class PredictionResponse(BaseModel):
    schema_version: str = SCHEMA_VERSION
    task: TaskName
    model: ModelInfo
    box_format: BoxFormat | None = None
    mask_format: MaskFormat | None = None
    results: list[ImageResult]


class ErrorResponse(BaseModel):
    error: str


ASCII_WHITESPACE = str.maketrans("", "", " \t\n\r\f\v")  # what `base64 FILE` wraps its output with (76 chars)


def decode_base64(text: str, index: int, field: str = "images") -> bytes:
    """Bytes of a base64 image string (with or without a data-URI prefix), or a 400 InputError. ASCII
    whitespace is dropped first (line-wrapped output of `base64`, a trailing newline); anything else that
    is not base64 is refused."""
    from services.errors import InputError

    text = text.translate(ASCII_WHITESPACE)
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(400, f"{field}[{index}]: not valid base64") from None


def convert_boxes(boxes_xyxy: np.ndarray, box_format: BoxFormat, width: int, height: int) -> np.ndarray:
    """xyxy pixel boxes [k, 4] to `box_format`."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4).copy()
    if box_format == "xywh":
        boxes[:, 2:] -= boxes[:, :2]
    elif box_format == "normalized":
        boxes /= np.array([width, height, width, height], dtype=np.float64)
    return boxes


def png_base64(mask: np.ndarray) -> str:
    """A uint8 [H, W] mask as a base64 PNG (lossless, small for masks)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L").save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def rle_counts(binary: np.ndarray) -> str:
    """COCO RLE counts of a binary [H, W] mask (column-major, pycocotools' compressed string)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
    return rle["counts"].decode("ascii")


def polygons(binary: np.ndarray) -> list[list[float]]:
    """Closed outlines of a binary [H, W] mask as [x0, y0, x1, y1, ...] lists (contours at 0.5)."""
    import contourpy

    # Pad so shapes touching the border still close.
    padded = np.pad(binary.astype(np.float64), 1)
    lines = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate).lines(0.5)
    return [np.round(line - 1.0, 2).reshape(-1).tolist() for line in lines if len(line) >= 3]


def encode_mask(mask: np.ndarray, mask_format: MaskFormat) -> Mask | None:
    """A mask in `mask_format` (None for `none`): png keeps its values (class + 1), rle/polygon
    describe its pixels > 0 (so segment sends one rle/polygon mask per class)."""
    if mask_format == "none":
        return None
    size = [int(mask.shape[0]), int(mask.shape[1])]
    if mask_format == "png":
        return Mask(format="png", size=size, png=png_base64(mask.astype(np.uint8)))
    foreground = mask > 0
    if mask_format == "rle":
        return Mask(format="rle", size=size, counts=rle_counts(foreground))
    return Mask(format="polygon", size=size, polygons=polygons(foreground))


def decode_mask(mask: Mask) -> np.ndarray:
    """A Mask back to a uint8 [H, W] array (png: the classes; rle: 0/1); for clients and tests."""
    height, width = mask.size
    if mask.format == "png":
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(mask.png or ""))))
    if mask.format == "rle":
        from pycocotools import mask as mask_utils

        return mask_utils.decode({"size": [height, width], "counts": (mask.counts or "").encode("ascii")})
    raise ValueError("polygon masks are outlines; rasterize them with your drawing library")
