"""A client's image to the model input and back, and whether it looks like the training data.

Decoding and the training geometry are `pipelines.decode`, the one implementation the fetch
stage uses too; this module adds what only the service needs: the server's limits (a
`DecodeError` becomes a 4xx `InputError`), how many pixels a decode will hold (read from the
header, for the server's pixel budget), the native scale of detect/segment (the upload's own
pixels up to `serve.max_side`, padded to a multiple of 32), the training-domain check behind each
result's `in_domain`, and boxes and masks mapped back to the client's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from PIL import Image

from pipelines.decode import (DecodeError, Placement, fit_square, full_size, letterbox, open_image, to_array,
                              to_image)
from pipelines.decode import decoded_pixels as header_pixels
from services.errors import InputError

__all__ = ["DecodeLimits", "Domain", "Fit", "ImageFacts", "Placement", "Prepared", "boxes_to_image", "decode",
           "decoded_pixels", "fit_square", "letterbox", "mask_to_image", "native", "prepare", "to_array"]

STRIDE = 32  # native inputs are padded to a multiple of the deepest stride of the served models
PROBE_SIDE = 64  # the domain check looks at a nearest-neighbour thumbnail this size at most
COLOUR_SPREAD = 0.05  # mean (max - min) over RGB, in [0, 1]: above it an image is colour, not grey
SIZE_FACTOR = 4.0  # an upload more than 4x larger or smaller (linear) than the training images is out of domain
ASPECT_FACTOR = 4.0  # ... and so is one whose width:height is more than 4x wider or taller than theirs
INTENSITY_SD = 1.0  # mean intensity beyond training mean +- 1 pixel sd is out of domain (Fashion-MNIST: 0.25% of test)


@dataclass(frozen=True)
class DecodeLimits:
    """What the server accepts: at most `max_pixels` per image, in one of `formats` (Pillow names)."""

    max_pixels: int
    formats: tuple[str, ...]


@dataclass(frozen=True)
class Fit:
    """How an upload becomes the model input: `resize(image, size)` of its decoded L or RGB image, and which side
    ("short" for fit_square, "long" for letterbox and native) a drafted JPEG keeps >= size."""

    resize: Callable[[Image.Image, int], tuple[np.ndarray, Placement]]
    size: int
    side: Literal["short", "long"]


@dataclass(frozen=True)
class ImageFacts:
    """What the domain check needs of a decoded image: its size, colour or grey, mean intensity in [0, 1]."""

    width: int
    height: int
    colour: bool
    mean: float


@dataclass(frozen=True)
class Prepared:
    """One upload ready for the model: uint8 [H, W, C] input, where it sits, and its facts."""

    array: np.ndarray
    placement: Placement
    facts: ImageFacts


def decode(source: bytes | Path, limits: DecodeLimits, min_side: int | None = None,
           side: Literal["short", "long"] = "short") -> Image.Image:
    """Decode untrusted bytes under the server's limits (pipelines.decode.open_image), or raise InputError."""
    try:
        return open_image(source, formats=limits.formats, max_pixels=limits.max_pixels, min_side=min_side,
                          side=side)
    except DecodeError as exc:
        raise InputError(exc.status, str(exc)) from None


def decoded_pixels(blob: bytes, limits: DecodeLimits, fit: Fit | None = None) -> int:
    """The pixels `decode` will hold for `blob` decoded for `fit` (None: at full size), from its header alone
    (pipelines.decode.decoded_pixels); 0 when decode refuses it unread."""
    return header_pixels(blob, formats=limits.formats, max_pixels=limits.max_pixels,
                         min_side=fit.size if fit else None, side=fit.side if fit else "short")


def native(image: Image.Image, max_side: int) -> tuple[np.ndarray, Placement]:
    """An L or RGB image at its own pixels (longer side fitted to `max_side` when larger), zero-padded at the
    bottom/right to a multiple of 32: the native-scale input of detect and segment."""
    width, height = image.size
    if max(height, width) > max_side:
        scale = max_side / max(height, width)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
    array = np.asarray(image).reshape(image.height, image.width, len(image.getbands()))
    new_h, new_w = array.shape[:2]
    padded = np.zeros((-(-new_h // STRIDE) * STRIDE, -(-new_w // STRIDE) * STRIDE, array.shape[2]), np.uint8)
    padded[:new_h, :new_w] = array
    return padded, Placement(width, height, new_w / width, new_h / height)


LUMA = np.float32([0.299, 0.587, 0.114])
GREY_MODES = frozenset({"1", "L", "I", "I;16", "F"})


def facts(image: Image.Image, in_channels: int) -> ImageFacts:
    """Full size, colour and mean intensity of a decoded image (the last two from a cheap nearest-neighbour
    thumbnail)."""
    probe_size = (min(image.width, PROBE_SIDE), min(image.height, PROBE_SIDE))
    probe = image if probe_size == image.size else image.resize(probe_size, Image.NEAREST)
    if probe.mode in GREY_MODES:  # no colour to measure: every channel (and luma) is the grey value
        return ImageFacts(*full_size(image), False, float(to_array(probe, 1).mean()) / 255.0)
    rgb = to_array(probe, 3).astype(np.float32) / 255.0
    spread = float((rgb.max(axis=2) - rgb.min(axis=2)).mean())
    # A grey model sees luma: Pillow's own L weights (ITU-R 601), without a second conversion.
    mean = float(rgb.mean()) if in_channels == 3 else float((rgb @ LUMA).mean())
    return ImageFacts(*full_size(image), spread > COLOUR_SPREAD, mean)


def prepare(blob: bytes, limits: DecodeLimits, fit: Fit, in_channels: int) -> Prepared:
    """An upload to its model input: decoded (drafted for `fit`), converted, fitted, placed in the upload's
    own pixels; raises InputError."""
    image = decode(blob, limits, fit.size, fit.side)
    try:  # a mode that decodes but does not convert (e.g. LAB to grey) is the upload's fault: a 4xx
        array, placement = fit.resize(to_image(image, in_channels), fit.size)  # never a full-size array or copy
        return Prepared(array, placement.for_size(*full_size(image)), facts(image, in_channels))
    except DecodeError as exc:
        raise InputError(exc.status, str(exc)) from None


@dataclass(frozen=True)
class Domain:
    """A model's training domain: channels, image side in pixels, pixel mean and sd in [0, 1], and width:height."""

    in_channels: int
    image_size: int
    mean: float
    std: float
    aspect: float = 1.0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Domain":
        """From a model's config.json: in_channels, per-channel mean/std of its training data, and the training
        images' size: their own (`source_size`, own photos: a 12 MP phone photo trained at 224 px is no larger
        than its training photos) or else the model input's (image_size as a side or [height, width])."""
        source = config.get("source_size")
        if source:
            side, aspect = int(source["side"]), float(source["aspect"])
        else:
            size = config["image_size"]
            height, width = (size[0], size[1]) if isinstance(size, (list, tuple)) else (size, size)
            side, aspect = int(np.sqrt(height * width)), width / height
        return cls(int(config["in_channels"]), side, float(np.mean(config["mean"])), float(np.mean(config["std"])),
                   aspect)

    def check(self, image: ImageFacts) -> list[tuple[str, str]]:
        """Why an image is outside the training domain, as (kind, reason) pairs; empty when inside."""
        found = []
        if self.in_channels == 1 and image.colour:
            found.append(("channels", "colour image for a greyscale model"))
        ratio = float(np.sqrt(image.width * image.height)) / self.image_size
        if ratio > SIZE_FACTOR:
            found.append(("size", f"{ratio:.1f}x larger than the training images ({self.image_size} px)"))
        elif ratio < 1.0 / SIZE_FACTOR:
            found.append(("size", f"{1.0 / ratio:.1f}x smaller than the training images ({self.image_size} px)"))
        stretch = (image.width / image.height) / self.aspect
        if max(stretch, 1.0 / stretch) > ASPECT_FACTOR:
            found.append(("aspect", f"{image.width}x{image.height} is {max(stretch, 1.0 / stretch):.1f}x "
                                    f"{'wider' if stretch > 1 else 'taller'} than the training images "
                                    f"(width:height {self.aspect:.3g}:1)"))
        if abs(image.mean - self.mean) > INTENSITY_SD * self.std:
            found.append(("intensity", f"mean intensity {image.mean:.2f} outside training {self.mean:.2f} "
                                       f"± {INTENSITY_SD * self.std:.2f} ({INTENSITY_SD:g} sd)"))
        return found


def boxes_to_image(boxes: np.ndarray, placement: Placement) -> np.ndarray:
    """Boxes [k, 4] xyxy in model-input pixels to the client image's pixels, clipped to it."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x = (boxes[:, [0, 2]] - placement.offset_x) / placement.scale_x
    y = (boxes[:, [1, 3]] - placement.offset_y) / placement.scale_y
    out = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, placement.width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, placement.height)
    return out


def mask_to_image(mask: np.ndarray, placement: Placement) -> np.ndarray:
    """A uint8 label mask of a letterboxed or padded input back to [height, width] (nearest neighbour)."""
    new_w = max(1, round(placement.width * placement.scale_x))
    new_h = max(1, round(placement.height * placement.scale_y))
    content = np.ascontiguousarray(mask[:new_h, :new_w], dtype=np.uint8)
    if content.shape == (placement.height, placement.width):
        return content
    return np.asarray(Image.fromarray(content).resize((placement.width, placement.height), Image.NEAREST))
