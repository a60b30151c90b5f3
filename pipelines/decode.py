"""One decode for every image file: the fetch stage's own-data readers and the service's uploads.

`open_image` turns a file or upload bytes into an oriented, fully loaded Pillow image: the
format comes from an allow-list (never from a client's Content-Type), the pixel count is checked
from the header before any pixel is decoded, Pillow's decompression-bomb warning is an error,
large JPEGs are decoded at 1/2..1/8 scale with `Image.draft()` (libjpeg's DCT scaling) when the
target size allows it, and EXIF orientation is applied. `to_image` turns any mode into an L or RGB
image the same way everywhere (alpha composited over black, 16-bit scaled to 8, float in 0..1 scaled
to 0..255, a float image holding NaN or infinity refused), `to_array` that into uint8 [H, W, in_channels].
`fit_square` (classification items) and `letterbox` (scenes) are the training geometry, each
returning the `Placement` that maps model-input pixels back to the image's own pixels. They take that
image as well as an array: a decoded image is resized as it is, never copied into numpy at full size (a
large RGB PNG then peaks at its decoded image, ~4 bytes a pixel).
Every failure is a `DecodeError` with an HTTP-like `status`: fetch reports it as a corrupt image,
the service answers it as a 4xx.
"""

from __future__ import annotations

import io
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
from PIL import Image, ImageOps

from models._errors import ConvForgeError

Picture = np.ndarray | Image.Image  # what fit_square and letterbox take: [H, W], [H, W, C] or a Pillow image
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
GREY_MODES = ("1", "L", "LA", "La", *WIDE_MODES)
BACKGROUND = (0, 0, 0, 255)  # training items sit on black (Fashion-MNIST, scenes): transparent = black
MAX_STRIP = 16  # fit_square: aspect ratios beyond this resample only the centre they keep
BAND_PIXELS = 1 << 20  # _to_8bit and _over_black convert this many pixels at a time (8 MB of float64)
FULL_SIZE = "convforge_full_size"  # image.info key: (width, height) of the whole image a drafted decode stands for


class DecodeError(ConvForgeError):
    """An image that cannot be used: `status` 400 (unreadable), 413 (too many pixels), 415 (format)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Placement:
    """Where an image of `width` x `height` sits in the model input: model = image * scale + offset."""

    width: int
    height: int
    scale_x: float
    scale_y: float
    offset_x: float = 0.0
    offset_y: float = 0.0

    def for_size(self, width: int, height: int) -> "Placement":
        """The same placement for the image at `width` x `height` (the full image a drafted decode stands for)."""
        return Placement(width, height, self.scale_x * self.width / width, self.scale_y * self.height / height,
                         self.offset_x, self.offset_y)


def _draft_size(width: int, height: int, min_side: int, side: str) -> tuple[int, int]:
    """The size to ask draft() for so the decoded `side` ("short"/"long") stays >= min_side."""
    reference = min(width, height) if side == "short" else max(width, height)
    factor = max(1.0, reference / min_side)
    return max(1, math.ceil(width / factor)), max(1, math.ceil(height / factor))


def _open(source: bytes | Path, formats: tuple[str, ...] | None) -> Image.Image:
    """Identify the file (header only); 400 when unreadable, 415 when its format is not allowed."""
    if isinstance(source, (bytes, bytearray, memoryview)) and not source:
        raise DecodeError(400, "empty image: no bytes")
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        # Only the allowed plugins parse the bytes; others never see them.
        return Image.open(stream, formats=list(formats) if formats is not None else None)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except Exception:  # noqa: BLE001 - any failure to identify untrusted bytes is the input's fault
        pass
    accepted = f"; accepted formats: {', '.join(formats)}" if formats else ""
    other = _identify(source) if formats is not None else None
    if other is not None and other not in formats:  # an allowed format that failed to parse is unreadable
        raise DecodeError(415, f"{other} images are not accepted{accepted}")
    raise DecodeError(400, f"not a readable image{accepted}")


def _identify(source: bytes | Path) -> str | None:
    """The format named by the file's first bytes (each plugin's signature check only: no plugin parses
    the untrusted bytes), else None."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        head = bytes(source[:64])
    else:
        with open(source, "rb") as handle:
            head = handle.read(64)
    Image.init()
    return next((name for name in Image.ID if Image.OPEN[name][1] and _accepts(Image.OPEN[name][1], head)), None)


def _accepts(check: Any, head: bytes) -> bool:
    """A plugin's signature check on the file's first bytes; a check that cannot read so few bytes (Pillow's
    DIB check unpacks 4: a 3-byte text upload) does not accept them."""
    try:
        return bool(check(head))
    except Exception:  # noqa: BLE001 - third-party checks raise struct.error, IndexError, ...
        return False


def _check_size(image: Image.Image, max_pixels: int | None) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise DecodeError(400, f"zero-size image ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise DecodeError(413, f"image of {width}x{height} = {width * height} pixels is over the limit "
                               f"of {max_pixels} pixels")


def _header(source: bytes | Path, formats: tuple[str, ...] | None, max_pixels: int | None, min_side: int | None,
            side: str) -> tuple[Image.Image, tuple[int, int]]:
    """The identified file, size-checked and, a JPEG, drafted for `min_side` (nothing decoded yet: `image.size` is
    what decoding will hold), and its full size."""
    image = _open(source, formats)
    _check_size(image, max_pixels)
    full = image.size
    if min_side and image.format == "JPEG":
        image.draft(None, _draft_size(*image.size, min_side, side))
    return image, full


def decoded_pixels(source: bytes | Path, *, formats: tuple[str, ...] | list[str] | None = None,
                   max_pixels: int | None = None, min_side: int | None = None,
                   side: Literal["short", "long"] = "short") -> int:
    """The pixels `open_image` with the same arguments will hold, from the header alone (a JPEG's at its draft
    scale); 0 when it refuses the file before decoding (unreadable, a format not allowed, over `max_pixels`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image, _ = _header(source, tuple(formats) if formats is not None else None, max_pixels, min_side, side)
        except (DecodeError, Image.DecompressionBombError, Image.DecompressionBombWarning):
            return 0
    return image.width * image.height


def open_image(source: bytes | Path, *, formats: tuple[str, ...] | list[str] | None = None,
               max_pixels: int | None = None, min_side: int | None = None,
               side: Literal["short", "long"] = "short") -> Image.Image:
    """Decode a file or bytes into an oriented (EXIF), fully loaded Pillow image, or raise DecodeError.

    `formats`: Pillow format names allowed (None: any). `max_pixels`: cap on width x height (413).
    `min_side`: a JPEG may be decoded at 1/2..1/8 scale while its shorter (`side="short"`, the
    fit_square geometry) or longer (`side="long"`, letterbox) side stays >= min_side; `full_size(image)`
    is then the size of the whole image, which results are mapped back to.
    """
    allowed = tuple(formats) if formats is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image, full = _header(source, allowed, max_pixels, min_side, side)
            image.load()
            stored = image.size
            # Phones store rotation in EXIF: use the orientation people see (in place: no copy).
            ImageOps.exif_transpose(image, in_place=True)
            turned = image.size != stored
            image.info[FULL_SIZE] = (full[1], full[0]) if turned else full
            return image
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            limit = max_pixels or Image.MAX_IMAGE_PIXELS
            raise DecodeError(413, f"image over the limit of {limit} pixels (decompression bomb)") from None
        except DecodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types on corrupt data
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise DecodeError(400, f"truncated or corrupt image ({reason})") from None


@contextmanager
def bomb_limit(max_pixels: int | None) -> Iterator[None]:
    """Pillow's decompression-bomb limit set to `max_pixels` (None: no check) for the block, then put back.

    Pillow keeps it in a module global (`Image.MAX_IMAGE_PIXELS`, 89.5 MP), which stops 108 and 200 MP phone
    photos: fetch, one thread reading the user's own files, sets data.max_pixels. The service, which decodes
    uploads on several threads, keeps Pillow's limit as a second guard beside serve.max_pixels."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def full_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the whole, oriented image: larger than `image.size` when open_image drafted it."""
    return tuple(image.info.get(FULL_SIZE, image.size))


def is_grey(image: Image.Image) -> bool:
    """Whether an image is greyscale by its mode (1/L/LA/16-bit/float); a dataset whose images
    all are gets in_channels 1, else 3."""
    return image.mode in GREY_MODES


def _require_finite(values: np.ndarray) -> None:
    """A float image's NaN and infinite values have no brightness: a guess (0, the clip's 255) would train on
    no-data as if it were dark or bright pixels, and spoil the 0..1 range check, so the image is refused."""
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise DecodeError(400, f"float image with {bad} NaN or infinite value(s) of {values.size}: write them as "
                               "numbers (e.g. 0 for no data)")


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit int or float image as 8-bit L: each kind's full range to 0..255. 16-bit grey (PNG/TIFF)
    spans 0..65535, a float image whose values stay within 1.0 spans 0..1 (scientific TIFFs); other 32-bit int
    and float images are clipped. Scaled in float64 a band of rows at a time: the image's own values (2-4 bytes a
    pixel) and the 8-bit result are all that is held whole (the whole image in float64 took ~24 bytes a pixel)."""
    raw = np.asarray(image)
    if image.mode == "F":
        _require_finite(raw)
    peak = raw.max(initial=0)
    sixteen_bit = image.mode.startswith("I;16") or (image.mode == "I" and peak > 255)
    unit = image.mode == "F" and peak <= 1.0
    out = np.empty(raw.shape, np.uint8)
    rows = max(1, BAND_PIXELS // max(1, raw.shape[1]))
    for top in range(0, raw.shape[0], rows):
        values = raw[top:top + rows].astype(np.float64)
        values = values / 257.0 if sixteen_bit else values * 255.0 if unit else values
        out[top:top + rows] = np.clip(np.rint(values), 0, 255)
    return Image.fromarray(out, mode="L")


def _over_black(image: Image.Image, target: str) -> Image.Image:
    """An image with alpha (or palette transparency) composited over black, as a `target` (L/RGB) image, a band of
    rows at a time: the image itself and the result are all that is held whole (the whole image as RGBA, a black
    RGBA background and the composite took ~12 bytes a pixel on top of the decoded image's 4)."""
    width, height = image.size
    out = Image.new(target, image.size)
    rows = max(1, BAND_PIXELS // max(1, width))
    for top in range(0, height, rows):
        band = image.crop((0, top, width, min(height, top + rows)))
        if band.mode == "La":  # premultiplied grey (a TIFF's associated alpha): Pillow converts it only to LA
            band = band.convert("LA")
        rgba = band if band.mode == "RGBA" else band.convert("RGBA")
        out.paste(Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND), rgba).convert(target), (0, top))
    return out


def to_image(image: Image.Image, in_channels: int) -> Image.Image:
    """Any mode (1/L/P/PA/LA/RGB/RGBA/CMYK/YCbCr/16-bit/float) to an L (in_channels 1: luma) or RGB image: 16-bit,
    int and float scaled to 8 bits (`_to_8bit`), alpha composited over black (`_over_black`). `image` itself when
    it already is one (Pillow's convert to the same mode would copy it).
    Raises DecodeError(400) for modes Pillow cannot convert."""
    target = "L" if in_channels == 1 else "RGB"
    try:
        if image.mode in WIDE_MODES:
            image = _to_8bit(image)
        if image.mode in ALPHA_MODES or "transparency" in image.info:
            return _over_black(image, target)
        return image if image.mode == target else image.convert(target)
    except (ValueError, OSError) as exc:
        raise DecodeError(400, f"cannot convert a {image.mode} image ({exc})") from None


def to_array(image: Image.Image, in_channels: int) -> np.ndarray:
    """`to_image` as uint8 [H, W, in_channels]."""
    flat = to_image(image, in_channels)
    return _shaped(flat, _bands(flat))


def _pil(picture: Picture) -> Image.Image:
    if isinstance(picture, Image.Image):
        return picture
    return Image.fromarray(picture[:, :, 0] if picture.ndim == 3 and picture.shape[2] == 1 else picture)


def _bands(picture: Picture) -> tuple[int, ...]:
    """The axes after [H, W] of the picture as an array: () for a 2-D array, (C,) for [H, W, C] or an image."""
    return (len(picture.getbands()),) if isinstance(picture, Image.Image) else picture.shape[2:]


def _shaped(image: Image.Image, bands: tuple[int, ...]) -> np.ndarray:
    out = np.asarray(image)
    return out.reshape(*out.shape[:2], *bands)


def fit_square(picture: Picture, size: int) -> tuple[np.ndarray, Placement]:
    """uint8 [H, W, C] (or an L/RGB image, its C 1/3): shorter side to `size` (bilinear, antialiased), then centre
    crop to size x size.

    The classify geometry; pixel-identical to torchvision's `resize(img, size)` + `center_crop(size)` up to an
    aspect ratio of MAX_STRIP (beyond it, only the kept centre is resampled).
    """
    image, bands = _pil(picture), _bands(picture)
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    scale_x, scale_y = new_w / width, new_h / height
    if max(new_w, new_h) > MAX_STRIP * size:
        # A strip (a 1 x 4,000,000 PNG is 8 KB): resizing it whole would make 28 x 112,000,000 pixels to keep
        # 28 x 28, so only the kept centre is resampled (Pillow's `box`: the same filter, within 1 of each value).
        box = (left / scale_x, top / scale_y, (left + size) / scale_x, (top + size) / scale_y)
        cropped = _shaped(image.resize((size, size), Image.BILINEAR, box=box), bands)
    else:
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.BILINEAR)
        cropped = _shaped(image.crop((left, top, left + size, top + size)), bands)
    return cropped, Placement(width, height, scale_x, scale_y, -left, -top)


def letterbox(picture: Picture, size: int, *, nearest: bool = False) -> tuple[np.ndarray, Placement]:
    """[H, W] or [H, W, C] (or an L/RGB image, as [H, W, 1/3]): longer side to `size`, zero padding at the
    bottom/right to size x size.

    The scene geometry (keeps the aspect ratio and every object); `nearest` for label masks.
    """
    image, bands = _pil(picture), _bands(picture)
    width, height = image.size
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = _shaped(image.resize((new_w, new_h), Image.NEAREST if nearest else Image.BILINEAR), bands)
    out = np.zeros((size, size, *bands), dtype=resized.dtype)
    out[:new_h, :new_w] = resized
    return out, Placement(width, height, new_w / width, new_h / height)


def decode_file(path: Path, in_channels: int, size: int, geometry: Literal["square", "letterbox"] = "square",
                formats: tuple[str, ...] | None = None) -> np.ndarray:
    """A file to the model's uint8 [size, size, in_channels] input, the way training and serving do it."""
    side = "short" if geometry == "square" else "long"
    with open_image(Path(path), formats=formats, min_side=size, side=side) as image:
        # Resized as the decoded image: its full size never becomes a numpy array (nor its bytes, nor a copy).
        return (fit_square if geometry == "square" else letterbox)(to_image(image, in_channels), size)[0]
