"""Safe decoding of client images and the geometry between a client's image and the model input.

Decoding is hardened: formats come from a server-side allow-list
(never from the client's Content-Type), the pixel count is checked from the header
before any pixel is decoded, Pillow's decompression-bomb warning is an error, and
`load()` forces a full decode so a truncated file fails here, as a 4xx, not in the model.
Geometry follows training: classify images are resized (shorter side) and centre-cropped
like `pipelines.sources._fit_square`; detect/segment images are letterboxed (longer side,
zero padding at the bottom/right) like the scenes, and boxes/masks are mapped back.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from services.errors import InputError

ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclass(frozen=True)
class DecodeLimits:
    """What the server accepts: at most `max_pixels` per image, in one of `formats` (Pillow names)."""

    max_pixels: int
    formats: tuple[str, ...]


@dataclass(frozen=True)
class Placement:
    """Where a client image of `width` x `height` sits in the model input: model = image * scale + offset."""

    width: int
    height: int
    scale_x: float
    scale_y: float
    offset_x: float = 0.0
    offset_y: float = 0.0


def decode(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Decode untrusted bytes into a fully loaded Pillow image, or raise InputError (400/413)."""
    if not data:
        raise InputError(400, "empty image: the upload has no bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=list(limits.formats))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputError(413, f"image over the limit of {limits.max_pixels} pixels") from None
        except Exception:  # noqa: BLE001 - any failure to identify untrusted bytes is the input's fault
            raise InputError(400, "not a readable image; accepted formats: " + ", ".join(limits.formats)) from None
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InputError(400, f"zero-size image ({width}x{height})")
        if width * height > limits.max_pixels:
            raise InputError(413, f"image of {width}x{height} = {width * height} pixels is over the limit "
                                  f"of {limits.max_pixels} pixels")
        try:
            image.load()
            # Phones store rotation in EXIF: answer in the orientation the client sees.
            image = ImageOps.exif_transpose(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputError(413, f"image over the limit of {limits.max_pixels} pixels") from None
        except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types on corrupt data
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise InputError(400, f"truncated or corrupt {image.format} image ({reason})") from None
    return image


def to_array(image: Image.Image, in_channels: int) -> np.ndarray:
    """Any mode (1/L/P/RGB/RGBA/CMYK/16-bit/float) to uint8 [H, W, in_channels]; alpha over black."""
    if image.mode in WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        # 16-bit grey (PNG/TIFF) spans 0..65535: scale to 8 bits; 32-bit int/float images are clipped.
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        # Training items sit on a black background (Fashion-MNIST, scenes): transparent = black.
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    array = np.asarray(image.convert("L" if in_channels == 1 else "RGB"))
    return array[:, :, None] if array.ndim == 2 else array


def fit_square(array: np.ndarray, size: int) -> tuple[np.ndarray, Placement]:
    """Shorter side to `size`, then centre crop: the classify geometry of training."""
    from torchvision.transforms.v2 import functional as F

    height, width = array.shape[:2]
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    resized = F.resize(image, size, antialias=True)
    new_w, new_h = resized.size
    cropped = np.asarray(F.center_crop(resized, size))
    placement = Placement(width, height, new_w / width, new_h / height,
                          -int(round((new_w - size) / 2.0)), -int(round((new_h - size) / 2.0)))
    return cropped.reshape(size, size, array.shape[2]), placement


def letterbox(array: np.ndarray, size: int) -> tuple[np.ndarray, Placement]:
    """Longer side to `size`, zero padding at the bottom/right: the detect/segment geometry of training."""
    height, width = array.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    resized = np.asarray(image.resize((new_w, new_h), Image.BILINEAR)).reshape(new_h, new_w, array.shape[2])
    out = np.zeros((size, size, array.shape[2]), dtype=np.uint8)
    out[:new_h, :new_w] = resized
    return out, Placement(width, height, new_w / width, new_h / height)


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
    """A uint8 [S, S] label mask of a letterboxed input back to [height, width] (nearest neighbour)."""
    new_w = max(1, round(placement.width * placement.scale_x))
    new_h = max(1, round(placement.height * placement.scale_y))
    content = np.ascontiguousarray(mask[:new_h, :new_w], dtype=np.uint8)
    if content.shape == (placement.height, placement.width):
        return content
    return np.asarray(Image.fromarray(content).resize((placement.width, placement.height), Image.NEAREST))
