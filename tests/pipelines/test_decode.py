"""pipelines/decode.py: one decode for training and serving, on real encoded files.

The parity test sends the same files through the fetch stage's path (`pipelines.sources.decode`, on
`pipelines.decode`, with the dataset's in_channels and working size) and through the service's path
from upload bytes to the model input (`services.imaging.prepare` with a loaded runner's fit),
and wants identical arrays.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import _checkpoint as checkpoint
from models._registry import build
from pipelines.decode import (ALPHA_MODES, BACKGROUND, MAX_STRIP, WIDE_MODES, DecodeError, Placement, _to_8bit,
                              decode_file, fit_square, full_size, is_grey, letterbox, open_image, to_array, to_image)
from pipelines import sources
from pipelines.params import load_params
from pipelines.tasks import ClassifyTask, SegmentTask
from services import imaging
from services.runners import load_runner

ROOT = Path(__file__).resolve().parents[2]


def photo(width: int = 120, height: int = 80) -> np.ndarray:
    """A smooth colour picture with a bright block at the top left (so orientation shows)."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=2)
    array[: height // 4, : width // 4] = 255
    return array.astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    """Stored landscape 120x80 with EXIF orientation 6: people see it portrait, 80x120."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(photo()), "JPEG", quality=92, exif=exif.tobytes())


def rgba_png() -> bytes:
    rgba = np.dstack([photo(), np.where(np.arange(120)[None, :] < 60, 255, 0).repeat(80, 0)]).astype(np.uint8)
    return encode(Image.fromarray(rgba, "RGBA"), "PNG")


def palette_png() -> bytes:
    palette = Image.fromarray(photo()).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    return encode(palette, "PNG", transparency=0)


def sixteen_bit_png() -> bytes:
    wide = (np.arange(90 * 70, dtype=np.uint32).reshape(70, 90) * 10).astype(np.uint16)
    return encode(Image.fromarray(wide), "PNG")


def cmyk_jpeg() -> bytes:
    return encode(Image.fromarray(photo()).convert("CMYK"), "JPEG", quality=92)


def large_jpeg() -> bytes:
    return encode(Image.fromarray(photo(1600, 1200)), "JPEG", quality=85)


FILES = {"exif6.jpg": exif_rotated_jpeg, "rgba.png": rgba_png, "palette.png": palette_png,
         "sixteen.png": sixteen_bit_png, "cmyk.jpg": cmyk_jpeg, "large.jpg": large_jpeg}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("photos")
    for name, make in FILES.items():
        (folder / name).write_bytes(make())
    return {name: folder / name for name in FILES}


def served_runner(directory: Path, task: str, family: str, in_channels: int, size: int, **hparams):
    """A tiny saved model of `task`, loaded the way the service loads it."""
    torch.manual_seed(0)
    model = build(task, family, 3, in_channels, size, **hparams)
    config = {"task": task, "family": family, "hparams": hparams, "num_classes": 3, "in_channels": in_channels,
              "image_size": size, "classes": ["a", "b", "c"], "mean": [0.3] * in_channels,
              "std": [0.3] * in_channels}
    checkpoint.save(model, config, directory)
    return load_runner(task, directory, name="tiny", version="v1", backend="torch", max_batch_size=4,
                       max_latency_ms=1000)


@pytest.mark.parametrize("task, family, hparams, geometry, size", [
    (ClassifyTask.name, "lenet5", {}, "square", 28),
    (SegmentTask.name, "unet", {"depth": 2, "width": 8}, "letterbox", 64),
])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_training_and_serving_decode_to_identical_inputs(files, tmp_path, task, family, hparams, geometry, size,
                                                         in_channels):
    params = load_params(ROOT / "params.yaml")
    serve = params.serve
    limits = imaging.DecodeLimits(serve.max_pixels, tuple(serve.formats))
    runner = served_runner(tmp_path / task, task, family, in_channels, size, **hparams)
    corrupt = sources.CorruptImages("fail", params.data.max_pixels)
    for name, path in files.items():
        fetched = sources.decode(path, in_channels, size, geometry, corrupt)
        served = imaging.prepare(path.read_bytes(), limits, runner.fit, in_channels).array
        assert fetched.dtype == served.dtype == np.uint8
        assert fetched.shape == served.shape == (size, size, in_channels), name
        assert np.array_equal(fetched, served), name
        assert np.array_equal(decode_file(path, in_channels, size, geometry), served), name


def test_exif_orientation_is_applied(files):
    image = open_image(files["exif6.jpg"])
    assert image.size == (80, 120)  # orientation 6: rotated 90 degrees clockwise for display
    array = to_array(image, 3)
    assert array[:20, -20:].min() > 200  # the bright top-left block is now top right
    assert array[:20, :20].min(axis=2).max() < 200  # and not at the top left any more


def test_modes_and_alpha_the_same_everywhere(files):
    rgba = to_array(open_image(files["rgba.png"]), 3)
    assert np.array_equal(rgba[:, :60], photo()[:, :60]) and rgba[:, 60:].max() == 0  # transparent = black
    palette = to_array(open_image(files["palette.png"]), 3)
    assert palette.shape == (80, 120, 3)
    sixteen = open_image(files["sixteen.png"])
    assert is_grey(sixteen) and to_array(sixteen, 1).max() == round(int(np.uint16(89 * 10 + 69 * 900)) / 257)
    cmyk = open_image(files["cmyk.jpg"])
    assert cmyk.mode == "CMYK" and not is_grey(cmyk) and to_array(cmyk, 3).shape == (80, 120, 3)
    assert to_array(Image.new("1", (4, 4), 1), 1).max() == 255


def test_float_images_in_0_to_1_span_0_to_255(tmp_path):
    ramp = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(ramp, "F").save(tmp_path / "unit.tif")
    Image.fromarray(ramp * 200, "F").save(tmp_path / "wide.tif")
    unit = to_array(open_image(tmp_path / "unit.tif"), 1)[:, :, 0]
    assert unit.min() == 0 and unit.max() == 255 and np.array_equal(unit, np.rint(ramp * 255).astype(np.uint8))
    wide = to_array(open_image(tmp_path / "wide.tif"), 1)[:, :, 0]
    assert np.array_equal(wide, np.rint(ramp * 200).astype(np.uint8))  # other float ranges: values as they are


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_images_holding_nan_or_infinity_are_refused_not_guessed(tmp_path, bad):
    """No-data pixels (NaN, as scientific TIFFs write them) or a division's infinity have no brightness: decoded,
    NaN became 0 through an undefined cast (and a RuntimeWarning line) and left a 0..1 image unscaled, near black."""
    ramp = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    ramp[3, 4] = bad
    Image.fromarray(ramp, "F").save(tmp_path / "holes.tif")
    with pytest.raises(DecodeError) as info:
        to_array(open_image(tmp_path / "holes.tif"), 1)
    assert info.value.status == 400 and str(info.value).startswith("float image with 1 NaN or infinite value(s)")


def test_large_jpegs_are_drafted_but_never_below_the_target(files):
    data = files["large.jpg"].read_bytes()
    assert open_image(data).size == (1600, 1200)
    assert open_image(data, min_side=28).size == (200, 150)  # 1/8 scale: shorter side 150 >= 28
    assert open_image(data, min_side=200).size == (400, 300)  # 1/4: 300 >= 200, 1/8 would give 150
    assert open_image(data, min_side=1000, side="long").size == (1600, 1200)  # 1/2 gives 800 < 1000
    assert open_image(data, min_side=800, side="long").size == (800, 600)
    assert full_size(open_image(data, min_side=28)) == (1600, 1200)  # what results map back to
    assert full_size(open_image(files["exif6.jpg"], min_side=10)) == (80, 120)  # drafted 15x10, turned


def test_placement_for_the_full_image_maps_to_its_pixels():
    drafted = Placement(200, 150, 28 / 150, 28 / 150, -5, 0)
    full = drafted.for_size(1600, 1200)
    assert (full.width, full.height, full.offset_x) == (1600, 1200, -5)
    assert full.scale_x * 1600 == pytest.approx(drafted.scale_x * 200)


def test_fit_square_is_torchvision_resize_and_centre_crop():
    from torchvision.transforms.v2 import functional as F

    rng = np.random.default_rng(0)
    for shape in [(40, 30, 3), (30, 40, 1), (100, 57, 3), (28, 28, 1)]:
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        image = Image.fromarray(array[:, :, 0] if shape[2] == 1 else array)
        expected = np.asarray(F.center_crop(F.resize(image, 16, antialias=True), 16)).reshape(16, 16, shape[2])
        assert np.array_equal(fit_square(array, 16)[0], expected)


def test_fit_square_of_a_strip_resamples_only_the_centre_it_keeps():
    """A 1 x 4,000,000 grey PNG is 8 KB: resized whole it would be 28 x 112,000,000 pixels (a MemoryError, the
    server's event loop stalled); only its kept centre is resampled. Past MAX_STRIP, within 1 of torchvision."""
    from torchvision.transforms.v2 import functional as F

    strip = np.full((4_000_000, 1, 1), 128, np.uint8)
    square, placement = fit_square(strip, 28)
    assert square.shape == (28, 28, 1) and np.all(square == 128)
    assert placement.scale_x == 28 and placement.offset_y == -round((112_000_000 - 28) / 2)
    array = np.random.default_rng(0).integers(0, 256, (30, 900, 3), dtype=np.uint8)  # 30:1, past MAX_STRIP
    expected = np.asarray(F.center_crop(F.resize(Image.fromarray(array), 16, antialias=True), 16))
    assert np.abs(fit_square(array, 16)[0].astype(int) - expected).max() <= 1


def test_letterbox_pads_bottom_right_and_resizes_masks_nearest():
    mask = np.zeros((50, 100), np.uint8)
    mask[10:20, 40:60] = 3
    boxed, placement = letterbox(mask, 40, nearest=True)
    assert boxed.shape == (40, 40) and placement == Placement(100, 50, 0.4, 0.4)
    assert set(np.unique(boxed)) == {0, 3} and boxed[20:].max() == 0


@pytest.mark.parametrize("data, status", [
    (b"", 400), (b"plain text, not an image", 400), (b"\x80\x04\x95pickle", 400), (b"vm\n", 400),
])
def test_unreadable_bytes_are_400(data, status):
    with pytest.raises(DecodeError) as info:
        open_image(data, formats=("PNG", "JPEG"))
    assert info.value.status == status
    assert "requires a buffer" not in str(info.value)  # a signature check that cannot read 3 bytes is no match


def test_format_cap_and_truncation_statuses(files):
    with pytest.raises(DecodeError) as info:
        open_image(files["rgba.png"], formats=("JPEG",))
    assert info.value.status == 415 and "PNG" in str(info.value)
    with pytest.raises(DecodeError) as info:
        open_image(files["large.jpg"], max_pixels=1_000_000)
    assert info.value.status == 413
    data = files["rgba.png"].read_bytes()
    with pytest.raises(DecodeError) as info:
        open_image(data[: len(data) // 2])
    assert info.value.status == 400 and "\n" not in str(info.value)


MODES = [("L", "PNG"), ("RGB", "PNG"), ("RGB", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("LA", "PNG"), ("CMYK", "TIFF"),
         ("I;16", "PNG"), ("F", "TIFF")]
SHAPES = [(120, 80), (80, 120), (97, 97), (61, 13), (5, 3), (900, 30), (30, 900)]  # the last two: strips


def noise(width: int, height: int, mode: str) -> Image.Image:
    """Random pixels in `mode` (any rounding difference shows), with random alpha in RGBA and LA."""
    rng = np.random.default_rng(width * 1000 + height)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode in ("RGBA", "LA"):
        image = rgb.convert(mode[:-1])
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
        return image
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)  # saved with a transparent index
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(rng.random((height, width), dtype=np.float32))
    return rgb.convert(mode)


def noise_file(folder: Path, width: int, height: int, mode: str, fmt: str) -> Path:
    path = folder / f"{mode.replace(';', '')}_{width}x{height}.{fmt.lower()}"
    noise(width, height, mode).save(path, format=fmt, **({"transparency": 0} if mode == "P" else {}))
    return path


def old_flatten(image: Image.Image) -> Image.Image:
    """Scaling and alpha as they were: alpha composited over black on the whole image at once, as RGBA."""
    if image.mode in WIDE_MODES:
        image = _to_8bit(image)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        image = image.convert("LA") if image.mode == "La" else image  # (it refused La: a 400 for such a TIFF)
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND), rgba)
    return image


def old_to_array(image: Image.Image, in_channels: int) -> np.ndarray:
    """to_array as it was before decode_file resized the decoded image itself: every pixel through numpy."""
    array = np.asarray(old_flatten(image).convert("L" if in_channels == 1 else "RGB"))
    return array[:, :, None] if array.ndim == 2 else array


@pytest.mark.parametrize("mode, fmt", MODES)
def test_resizing_the_decoded_image_gives_the_pixels_of_the_array_path(tmp_path, mode, fmt):
    """decode_file and the service resize the converted Pillow image instead of an array made from it: the same
    pixels and placement as the old arithmetic (fit_square or letterbox of to_array's array), every mode, both
    geometries, sizes that shrink and grow, and strips past MAX_STRIP (fit_square's centre-only resample)."""
    assert max(SHAPES[-1]) / min(SHAPES[-1]) > MAX_STRIP
    for width, height in SHAPES:
        path = noise_file(tmp_path, width, height, mode, fmt)
        assert open_image(path).mode == mode and (mode != "P" or "transparency" in open_image(path).info)
        for size, geometry, in_channels in [(s, g, c) for s in (7, 28, 64) for g in ("square", "letterbox")
                                            for c in (1, 3)]:
            fit = fit_square if geometry == "square" else letterbox
            image = open_image(path, min_side=size, side="short" if geometry == "square" else "long")
            expected, placement = fit(old_to_array(image, in_channels), size)
            case = (width, height, size, geometry, in_channels)
            assert np.array_equal(to_array(image, in_channels), old_to_array(image, in_channels)), case
            pixels, where = fit(to_image(image, in_channels), size)
            assert np.array_equal(pixels, expected) and where == placement, case
            got = decode_file(path, in_channels, size, geometry)
            assert got.dtype == np.uint8 and got.shape == expected.shape and np.array_equal(got, expected), case


@pytest.mark.parametrize("mode, fmt", [m for m in MODES if m[0] not in ("I;16", "F") and m[1] != "JPEG"])
def test_the_full_size_image_never_becomes_a_numpy_array(tmp_path, monkeypatch, mode, fmt):
    """A 200 MP PNG peaked at 2.7 GB in fetch (~14 bytes a pixel): the decoded image became bytes, an array and a
    Pillow image again before it was resized. Now only what is as small as the model input (or the service's
    64 px domain probe) is turned into numpy or back. 16-bit and float images go through numpy to be scaled, and
    a JPEG is drafted near the input size, so neither is a case here."""
    width, height = 400, 300
    path = noise_file(tmp_path, width, height, mode, fmt)
    limits = imaging.DecodeLimits(max_pixels=1_000_000, formats=(fmt,))
    converted = []  # pixels of each image turned into bytes (numpy's way in) and of each array made an image

    def spy(original, pixels):
        def counted(first, *args, **kwargs):
            converted.append(pixels(first))
            return original(first, *args, **kwargs)
        return counted

    monkeypatch.setattr(Image.Image, "tobytes", spy(Image.Image.tobytes, lambda image: image.width * image.height))
    monkeypatch.setattr(Image, "fromarray", spy(Image.fromarray, lambda array: int(np.prod(np.shape(array)[:2]))))
    for size, geometry, in_channels in [(28, "square", 1), (28, "square", 3), (40, "letterbox", 1),
                                        (40, "letterbox", 3)]:
        fit = imaging.Fit(fit_square, size, "short") if geometry == "square" else imaging.Fit(letterbox, size, "long")
        converted.clear()
        assert decode_file(path, in_channels, size, geometry).shape == (size, size, in_channels)
        fetched, converted[:] = list(converted), []
        assert imaging.prepare(path.read_bytes(), limits, fit, in_channels).array.shape == (size, size, in_channels)
        largest = max(size, imaging.PROBE_SIDE) ** 2  # the model input, the domain check's probe
        assert fetched and converted and max(fetched + converted) <= largest < width * height, \
            (geometry, in_channels, fetched, converted)


def old_to_8bit(image: Image.Image) -> np.ndarray:
    """_to_8bit's scaling of 16-bit, int and float images as it was: the whole image in float64 at once."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0
    elif image.mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("rows", [1, 7, 1 << 20])  # pixels a band: one row, bands of a row and a part, one band
def test_wide_images_scale_a_band_at_a_time_to_the_old_pixels(monkeypatch, rows):
    """16-bit (both byte orders), 32-bit int and float images, both ranges each and negatives, give the pixels of
    scaling the whole image at once, whatever the band size."""
    from pipelines import decode

    monkeypatch.setattr(decode, "BAND_PIXELS", rows)
    rng = np.random.default_rng(7)
    sixteen = rng.integers(0, 65536, (13, 11), dtype=np.uint16)
    images = [Image.fromarray(sixteen),                                                         # I;16
              Image.frombytes("I;16B", (11, 13), sixteen.astype(">u2").tobytes()),              # I;16B
              Image.fromarray(rng.integers(-300, 70000, (13, 11), dtype=np.int32)),             # I, > 255
              Image.fromarray(rng.integers(-20, 255, (13, 11), dtype=np.int32)),                # I, <= 255
              Image.fromarray(rng.random((13, 11), dtype=np.float32)),                          # F in 0..1
              Image.fromarray((rng.random((13, 11), dtype=np.float32) - 0.2) * 400),            # F, clipped
              Image.fromarray(np.float32([[0.5 / 255, 1.5 / 255], [2.5 / 255, 1.0]]))]          # F, halves
    assert [image.mode for image in images] == ["I;16", "I;16B", "I", "I", "F", "F", "F"]
    for image in images:
        flat = _to_8bit(image)
        assert flat.mode == "L" and np.array_equal(np.asarray(flat), old_to_8bit(image)), image.mode


def test_a_wide_image_is_never_held_whole_in_float64(monkeypatch):
    """A 16-bit image took ~24 bytes a pixel to scale (float64 copies of the whole image); now its own values, the
    8-bit result and one band: numpy reports its buffers to tracemalloc, so this counts them, not the RSS."""
    import tracemalloc

    from pipelines import decode

    monkeypatch.setattr(decode, "BAND_PIXELS", 1 << 14)  # bands well under the image, as a large one has them
    side = 1000
    image = Image.fromarray(np.random.default_rng(0).integers(0, 65536, (side, side), dtype=np.uint16))
    tracemalloc.start()
    try:
        _to_8bit(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * side * side, f"{peak / side / side:.1f} bytes a pixel"


def alpha_images() -> list[Image.Image]:
    """Every kind of transparency Pillow decodes: straight and premultiplied alpha, grey and colour, and a palette's
    transparent index; random pixels and alpha, so any rounding difference shows."""
    rng = np.random.default_rng(11)
    rgb = Image.fromarray(rng.integers(0, 256, (13, 11, 3), dtype=np.uint8))
    alpha = Image.fromarray(rng.integers(0, 256, (13, 11), dtype=np.uint8))
    rgba, la = rgb.copy(), rgb.convert("L")
    rgba.putalpha(alpha)
    la.putalpha(alpha)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    pa = palette.copy()
    pa.putalpha(alpha)
    grey_key = la.convert("L")
    grey_key.info["transparency"] = int(np.asarray(grey_key)[0, 0])
    return [rgba, la, rgba.convert("RGBa"), la.convert("La"), palette, pa, grey_key]


@pytest.mark.parametrize("rows", [1, 7, 1 << 20])  # pixels a band: one row, bands of a row and a part, one band
def test_alpha_is_composited_a_band_at_a_time_to_the_old_pixels(monkeypatch, rows):
    """Alpha over black a band of rows at a time gives the pixels of compositing the whole image as RGBA, every
    kind of transparency, into L and RGB, whatever the band size. Premultiplied grey (La, a TIFF with associated
    alpha) was refused with 'conversion from La to L not supported': now it is unpremultiplied first."""
    from pipelines import decode

    monkeypatch.setattr(decode, "BAND_PIXELS", rows)
    images = alpha_images()
    assert [image.mode for image in images] == ["RGBA", "LA", "RGBa", "La", "P", "PA", "L"]
    for image in images:
        for in_channels in (1, 3):
            assert np.array_equal(to_array(image, in_channels), old_to_array(image, in_channels)), \
                (image.mode, in_channels)


def test_an_alpha_image_is_never_composited_whole(monkeypatch):
    """A 100 MP RGBA PNG took ~11.5 bytes a pixel over its decode to flatten (the image as RGBA, a black RGBA
    background and their composite, all whole); now each of those is one band. Pillow's buffers are not
    tracemalloc's, so this counts the pixels of every image alpha_composite makes."""
    from pipelines import decode

    monkeypatch.setattr(decode, "BAND_PIXELS", 1000)
    made = []
    original = Image.alpha_composite

    def counted(background: Image.Image, image: Image.Image) -> Image.Image:
        made.append(image.width * image.height)
        return original(background, image)

    monkeypatch.setattr(Image, "alpha_composite", counted)
    image = Image.new("RGBA", (100, 400), (200, 100, 50, 128))
    flat = to_image(image, 3)
    assert flat.mode == "RGB" and flat.size == image.size and flat.getpixel((99, 399)) == (100, 50, 25)
    assert len(made) == 40 and max(made) == 1000, made


def test_a_tiff_with_premultiplied_grey_alpha_decodes():
    """A grey TIFF with associated (premultiplied) alpha opens as La, which Pillow converts only to LA: it was a
    400 'cannot convert a La image'. Pillow writes LA with unassociated alpha (ExtraSamples 2), so the tag is
    rewritten to 1 here, as such a file has it."""
    grey, alpha = 100, 128  # premultiplied: 100 is the grey over black already
    data = encode(Image.new("LA", (6, 4), (grey, alpha)), "TIFF")
    entry = (338).to_bytes(2, "little") + (3).to_bytes(2, "little") + (1).to_bytes(4, "little")  # SHORT, 1 value
    assert data.count(entry + (2).to_bytes(2, "little")) == 1
    data = data.replace(entry + (2).to_bytes(2, "little"), entry + (1).to_bytes(2, "little"))
    image = open_image(data)
    assert image.mode == "La" and is_grey(image)
    for in_channels in (1, 3):
        assert np.abs(to_array(image, in_channels).astype(int) - grey).max() <= 1
