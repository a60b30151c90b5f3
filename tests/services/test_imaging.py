"""Hardened decoding under the server's limits, native scale, the domain check and mapping back
(services/imaging.py) on real encoded images."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from services.errors import InputError
from services.imaging import (DecodeLimits, Domain, Fit, ImageFacts, Placement, boxes_to_image, decode, facts,
                              fit_square, letterbox, mask_to_image, native, prepare, to_array)

LIMITS = DecodeLimits(max_pixels=4_000_000, formats=("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM"))


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def gradient(width: int = 20, height: int = 12, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array, "RGB").convert(mode)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny IDAT: a decompression-bomb shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM"])
def test_allowed_formats_decode_fully(fmt):
    image = decode(encode(gradient(), fmt), LIMITS)
    assert image.size == (20, 12)
    assert to_array(image, 3).shape == (12, 20, 3)


def test_png_pixels_survive_exactly():
    source = gradient()
    assert np.array_equal(to_array(decode(encode(source, "PNG"), LIMITS), 3), np.asarray(source))


def test_modes_grey_rgba_16bit_palette_to_channels():
    grey = decode(encode(gradient(mode="L"), "PNG"), LIMITS)
    assert to_array(grey, 1).shape == (12, 20, 1)
    assert to_array(grey, 3).shape == (12, 20, 3)
    rgba = Image.new("RGBA", (4, 4), (200, 100, 50, 0))
    rgba.putpixel((0, 0), (200, 100, 50, 255))
    out = to_array(decode(encode(rgba, "PNG"), LIMITS), 3)
    assert out[0, 0].tolist() == [200, 100, 50] and out[1, 1].tolist() == [0, 0, 0]  # transparent = black
    wide = Image.fromarray(np.full((5, 6), 65535, np.uint16))
    sixteen = decode(encode(wide, "PNG"), LIMITS)
    assert sixteen.mode.startswith("I")
    assert to_array(sixteen, 1).max() == 255
    palette = decode(encode(gradient().convert("P"), "GIF"), LIMITS)
    assert to_array(palette, 3).dtype == np.uint8


@pytest.mark.parametrize("data, status, words", [
    (b"", 400, "empty"),
    (b"definitely not an image, just text bytes", 400, "not a readable image"),
    (b"\x80\x04\x95pickle-ish", 400, "not a readable image"),
])
def test_bad_bytes_are_4xx(data, status, words):
    with pytest.raises(InputError) as info:
        decode(data, LIMITS)
    assert info.value.status == status and words in str(info.value)


def test_truncated_files_are_400():
    for fmt in ("PNG", "JPEG"):
        data = encode(gradient(200, 200), fmt)
        with pytest.raises(InputError) as info:
            decode(data[: len(data) // 2], LIMITS)
        assert info.value.status == 400
        assert "\n" not in str(info.value)


def test_formats_outside_the_allow_list_are_refused():
    ico = encode(gradient(16, 16), "ICO")
    with pytest.raises(InputError) as info:
        decode(ico, LIMITS)
    assert info.value.status == 415 and "ICO" in str(info.value)
    only_png = DecodeLimits(LIMITS.max_pixels, ("PNG",))
    with pytest.raises(InputError):
        decode(encode(gradient(), "JPEG"), only_png)


def test_pixel_cap_and_decompression_bombs_are_413_before_decoding():
    with pytest.raises(InputError) as info:
        decode(png_header_only(3000, 3000), LIMITS)  # 9 MP > 4 MP cap, from the header alone
    assert info.value.status == 413
    with pytest.raises(InputError) as info:
        decode(png_header_only(20000, 20000), DecodeLimits(10**9, ("PNG",)))  # Pillow's own bomb check
    assert info.value.status == 413


def test_large_image_under_the_cap_decodes():
    big = gradient(1900, 1000)
    assert decode(encode(big, "JPEG", quality=70), LIMITS).size == (1900, 1000)


def test_zero_size_header_is_400():
    with pytest.raises(InputError) as info:
        decode(png_header_only(0, 10), LIMITS)
    assert info.value.status == 400


def test_letterbox_keeps_aspect_and_maps_boxes_back():
    array = np.zeros((50, 100, 1), np.uint8)
    array[10:20, 40:60] = 255
    boxed, placement = letterbox(array, 40)
    assert boxed.shape == (40, 40, 1)
    assert placement == Placement(100, 50, 0.4, 0.4)
    assert boxed[20:, :].max() == 0  # padding at the bottom
    ys, xs = np.nonzero(boxed[:, :, 0] > 127)
    model_box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float64)
    back = boxes_to_image(model_box, placement)
    assert np.allclose(back, [[40, 10, 60, 20]], atol=2.5)


def test_boxes_are_clipped_to_the_image():
    placement = Placement(100, 50, 0.4, 0.4)
    assert boxes_to_image(np.array([[-4, -4, 45, 45]]), placement).tolist() == [[0, 0, 100, 50]]


def test_mask_back_to_input_size_drops_padding():
    mask = np.zeros((40, 40), np.uint8)
    mask[0:20, 0:20] = 3
    mask[30:, :] = 7  # in the padding: must vanish
    back = mask_to_image(mask, Placement(100, 50, 0.4, 0.4))
    assert back.shape == (50, 100)
    assert set(np.unique(back)) == {0, 3}
    assert back[:50, :50].min() == 3


def test_fit_square_matches_training_geometry():
    from torchvision.transforms.v2 import functional as F

    image = gradient(30, 20, "L")
    expected = np.asarray(F.center_crop(F.resize(image, 16, antialias=True), 16))
    out, placement = fit_square(np.asarray(image)[:, :, None], 16)
    assert np.array_equal(out[:, :, 0], expected)
    assert placement.width == 30 and placement.height == 20


def test_native_keeps_pixels_pads_to_32_and_fits_large_uploads():
    array = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    out, placement = native(Image.fromarray(array), 1024)
    assert out.shape == (64, 96, 3) and np.array_equal(out[:50, :70], array) and out[50:].max() == 0
    assert placement == Placement(70, 50, 1.0, 1.0)
    big, placement = native(Image.new("L", (2000, 300)), 1000)
    assert big.shape == (160, 1024, 1) and placement.scale_x == 0.5
    mask = np.zeros(big.shape[:2], np.uint8)
    mask[:150, :1000] = 2
    assert (mask_to_image(mask, placement) == 2).all()


def test_domain_rules_each_explain_themselves():
    grey28 = Domain(in_channels=1, image_size=28, mean=0.29, std=0.35)
    assert grey28.check(ImageFacts(28, 28, colour=False, mean=0.3)) == []
    kinds = dict(grey28.check(ImageFacts(235, 235, colour=True, mean=0.95)))
    assert kinds["channels"] == "colour image for a greyscale model"
    assert kinds["size"].startswith("8.4x larger than the training images")
    assert kinds["intensity"].startswith("mean intensity 0.95 outside training 0.29")
    assert dict(grey28.check(ImageFacts(5, 5, colour=False, mean=0.3)))["size"].startswith("5.6x smaller")
    colour = Domain(in_channels=3, image_size=32, mean=0.47, std=0.25)
    assert colour.check(ImageFacts(32, 32, colour=True, mean=0.5)) == []


def test_facts_tell_colour_from_grey_stored_as_rgb():
    grey_rgb = gradient(300, 200, "L").convert("RGB")
    assert not facts(decode(encode(grey_rgb, "JPEG", quality=90), LIMITS), 1).colour
    assert facts(decode(encode(gradient(300, 200), "JPEG", quality=90), LIMITS), 1).colour
    white = facts(Image.new("L", (40, 40), 255), 1)
    assert white.mean == 1.0 and (white.width, white.height) == (40, 40)


def test_prepared_drafted_jpegs_are_placed_in_the_uploads_own_pixels():
    wide = encode(gradient(1200, 400), "JPEG", quality=90)
    item = prepare(wide, LIMITS, Fit(letterbox, 40, "long"), 1)
    assert item.array.shape == (40, 40, 1)
    assert (item.placement.width, item.placement.height) == (1200, 400)  # not the drafted 600 x 200
    assert (item.facts.width, item.facts.height) == (1200, 400)
    assert mask_to_image(np.ones((40, 40), np.uint8), item.placement).shape == (400, 1200)
    assert np.allclose(boxes_to_image(np.array([[0, 0, 40, 13.33]]), item.placement), [[0, 0, 1200, 400]], atol=1)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "I;16"])
def test_prepare_gives_the_pixels_of_fitting_to_arrays_array(mode):
    """prepare resizes the decoded image itself (no full-size array): each fit gives the pixels and placement of
    fitting to_array's array, as prepare did before (native, which takes images alone, that array as an image)."""
    wide = Image.fromarray(np.arange(4500, dtype=np.uint16).reshape(50, 90) * 13)
    image = wide if mode == "I;16" else gradient(90, 50, mode)
    if mode == "RGBA":
        image.putalpha(gradient(90, 50, "L"))
    blob = encode(image, "TIFF")
    assert decode(blob, LIMITS).mode == mode
    for fit in (Fit(fit_square, 28, "short"), Fit(letterbox, 40, "long"), Fit(native, 64, "long")):
        for in_channels in (1, 3):
            array = to_array(decode(blob, LIMITS), in_channels)
            picture = Image.fromarray(array[:, :, 0] if in_channels == 1 else array) if fit.resize is native else array
            expected, placement = fit.resize(picture, fit.size)
            item = prepare(blob, LIMITS, fit, in_channels)
            assert np.array_equal(item.array, expected) and item.placement == placement, (fit, in_channels)


def test_an_image_that_decodes_but_does_not_convert_is_a_4xx():
    """A LAB TIFF opens (TIFF is allowed) but Pillow cannot make it grey: the client's fault, not a 500."""
    lab = encode(Image.new("LAB", (16, 16), (50, 10, 10)), "TIFF")
    grey = Fit(fit_square, 28, "short")
    with pytest.raises(InputError) as info:
        prepare(lab, LIMITS, grey, 1)
    assert 400 <= info.value.status < 500 and "\n" not in str(info.value)


def test_decoded_pixels_are_read_from_the_header_as_the_decode_will_hold_them():
    """What the pixel budget holds for an upload before it decodes: its size, a JPEG's at its draft scale."""
    from services.imaging import decoded_pixels

    photo = encode(gradient(1600, 1200), "JPEG", quality=90)
    for fit in (Fit(fit_square, 28, "short"), Fit(letterbox, 64, "long"), Fit(native, 1024, "long"), None):
        drafted = decode(photo, LIMITS, fit.size if fit else None, fit.side if fit else "short")
        assert decoded_pixels(photo, LIMITS, fit) == drafted.width * drafted.height, fit
    assert decoded_pixels(photo, LIMITS, Fit(fit_square, 28, "short")) == 200 * 150  # 1/8 scale
    assert decoded_pixels(encode(gradient(300, 200), "PNG"), LIMITS, Fit(fit_square, 28, "short")) == 300 * 200
    assert decoded_pixels(png_header_only(3000, 3000), LIMITS) == 0  # over max_pixels: refused unread
    assert decoded_pixels(b"not an image", LIMITS) == 0


def test_a_strip_is_out_of_domain_by_its_aspect_ratio():
    """A 1 x 1000 strip has the pixels of a 32 px square: its size looked in domain, its shape is not."""
    grey28 = Domain(in_channels=1, image_size=28, mean=0.29, std=0.35)
    assert dict(grey28.check(ImageFacts(1, 1000, colour=False, mean=0.3))) == {
        "aspect": "1x1000 is 1000.0x taller than the training images (width:height 1:1)"}
    wide_strip = dict(grey28.check(ImageFacts(1000, 1, colour=False, mean=0.3)))
    assert wide_strip["aspect"].startswith("1000x1 is 1000.0x wider")
    assert grey28.check(ImageFacts(84, 28, colour=False, mean=0.3)) == []  # 3:1 is still a photo's shape
    wide = Domain.from_config({"in_channels": 1, "image_size": [32, 96], "mean": [0.3], "std": [0.3]})
    assert wide.check(ImageFacts(96, 32, colour=False, mean=0.3)) == []
    assert "taller" in dict(wide.check(ImageFacts(32, 96, colour=False, mean=0.3)))["aspect"]
