"""pipelines/sources.py on the user's own folders as people lay them out: split folders, hidden entries, the
image suffixes, data.max_train, the class count, photo sizes (data.max_pixels), and palette, 1-bit and 0/255
masks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, features

from pipelines.errors import ConvForgeError
from pipelines.params import DataParams, validate
from pipelines.raw import fetch, load_raw
from pipelines.sources import IMAGE_SUFFIXES, spread_limit

ROOT = Path(__file__).resolve().parents[2]


def data_params(project_params, **overrides) -> DataParams:
    return validate(DataParams, {**project_params.data.model_dump(), **overrides}, prefix="data")


def fetch_own(tmp_path, project_params, dataset: str, **overrides):
    """fetch() of own data into tmp_path/raw: (meta, the opened raw data)."""
    meta = fetch(data_params(project_params, dataset=dataset, **overrides), tmp_path / "raw")
    return meta, load_raw(tmp_path / "raw")


def write_classes(root: Path, classes: dict[str, int], suffix: str = ".png") -> None:
    """root/<class>/<i><suffix>: `count` small grey images per class, brightness by class."""
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("L", (10, 8), 20 + 40 * c).save(root / name / f"{i:02d}{suffix}", format="PNG")


def one_line_error(call) -> str:
    with pytest.raises(ConvForgeError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


# ---- pre-split trees: train/ and test/ only, a split name never a class ------------------------------

@pytest.mark.parametrize("splits, named", [(("train", "val"), "val/"), (("train", "val", "test"), "val/"),
                                           (("train", "validation", "test"), "validation/"),
                                           (("train", "test", "extra"), "extra/")])
def test_a_folder_beside_train_and_test_is_one_error_naming_it(tmp_path, project_params, splits, named):
    for split in splits:
        write_classes(tmp_path / "pets" / split, {"cat": 3, "dog": 3})
    message = one_line_error(lambda: fetch(data_params(project_params, dataset=f"imagefolder:{tmp_path / 'pets'}",
                                                       image_size=8), tmp_path / "raw"))
    assert named in message and "move" in message and "augment.val_fraction" in message


def test_train_without_test_is_one_error(tmp_path, project_params):
    write_classes(tmp_path / "pets" / "train", {"cat": 3, "dog": 3})
    message = one_line_error(lambda: fetch(data_params(project_params, dataset=f"imagefolder:{tmp_path / 'pets'}",
                                                       image_size=8), tmp_path / "raw"))
    assert "test/ is missing" in message


def test_masks_presplit_tree_follows_the_same_rule(tmp_path, project_params):
    for split in ("train", "valid", "test"):
        write_mask_pairs(tmp_path / "seg" / split, voc_mask)
    message = one_line_error(lambda: fetch(data_params(project_params, dataset=f"masks:{tmp_path / 'seg'}"),
                                           tmp_path / "raw"))
    assert "valid/" in message


def test_the_stage_says_a_layout_error_on_one_line(tmp_path):
    for split in ("train", "val"):
        write_classes(tmp_path / "pets" / split, {"cat": 2, "dog": 2})
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["dataset"] = f"imagefolder:{tmp_path / 'pets'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "-m", "pipelines.stages.fetch"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'pets'}: a pre-split tree holds only train/ and test/")
    assert "found val/ beside them" in line


# ---- hidden entries and suffixes ---------------------------------------------------------------------

def test_hidden_files_and_folders_are_skipped_at_any_depth(tmp_path, project_params):
    root = tmp_path / "pets"
    write_classes(root, {"cat": 5, "dog": 5})
    write_classes(root / ".ipynb_checkpoints", {"cat": 2})  # a hidden class-like folder
    write_classes(root / "cat" / ".thumbnails", {"small": 2})  # hidden, one level down
    (root / "cat" / "._00.png").write_bytes(b"\x00\x05\x16\x07AppleDouble resource fork")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    meta, raw = fetch_own(tmp_path, project_params, f"imagefolder:{root}", image_size=8)
    assert raw.classes == ["cat", "dog"] and meta["skipped"] == []
    assert meta["splits"] == {"train": 8, "test": 2}


def test_hidden_files_beside_masks_images_are_skipped(tmp_path, project_params):
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(5):
        mask = np.zeros((12, 12), np.uint8)
        mask[2:8, 2:8] = 1
        Image.fromarray(mask * 100).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    (root / "images" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    meta, raw = fetch_own(tmp_path, project_params, f"masks:{root}", image_size=12)
    assert meta["skipped"] == [] and raw.count("train") + raw.count("test") == 5


def test_every_image_suffix_pillow_reads_is_listed_and_the_rest_is_said(tmp_path, project_params, capsys):
    root = tmp_path / "pets"
    write_classes(root, {"cat": 4, "dog": 4})
    Image.new("L", (10, 8), 50).save(root / "cat" / "04.gif")
    Image.new("RGB", (10, 8)).save(root / "dog" / "04.jfif", format="JPEG")
    if ".avif" in IMAGE_SUFFIXES:
        Image.new("RGB", (10, 8)).save(root / "dog" / "05.avif")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "IMG_1.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (root / "README.md").write_text("the photos")
    Image.new("L", (10, 8)).save(root / "stray.png")
    meta, _ = fetch_own(tmp_path, project_params, f"imagefolder:{root}", image_size=8)
    assert sum(meta["splits"].values()) == 10 + (".avif" in IMAGE_SUFFIXES)
    err = capsys.readouterr().err
    assert "warning: ignored 2 file(s) that are not images (.heic, .txt)" in err
    assert "warning: ignored 2 file(s) outside the class folders (.md, .png)" in err


def test_avif_is_listed_exactly_when_pillow_reads_it():
    assert (".avif" in IMAGE_SUFFIXES) == features.check("avif") and ".jfif" in IMAGE_SUFFIXES


# ---- data.max_train and the class count ------------------------------------------------------------

def test_max_train_keeps_every_class(tmp_path, project_params):
    write_classes(tmp_path / "abc", {"a": 10, "b": 10, "c": 10})
    _, raw = fetch_own(tmp_path, project_params, f"imagefolder:{tmp_path / 'abc'}", image_size=8, max_train=7,
                       max_test=3)
    assert raw.labels("train").tolist() == [0, 0, 0, 1, 1, 2, 2] and raw.labels("test").tolist() == [0, 1, 2]


def test_spread_limit_is_round_robin_over_classes_in_listed_order():
    items = [("a0", 0), ("b0", 1), ("b1", 1), ("b2", 1), ("b3", 1), ("c0", 2), ("c1", 2)]
    assert spread_limit(items, 5) == [("a0", 0), ("b0", 1), ("b1", 1), ("c0", 2), ("c1", 2)]
    assert spread_limit(items, None) == items and spread_limit(items, 10) == items


def test_one_class_folder_is_one_error(tmp_path, project_params):
    write_classes(tmp_path / "only", {"cat": 5})
    message = one_line_error(lambda: fetch(data_params(project_params, dataset=f"imagefolder:{tmp_path / 'only'}",
                                                       image_size=8), tmp_path / "raw"))
    assert "at least 2 classes" in message


def test_more_classes_than_scene_masks_hold_classify_and_say_why_scenes_cannot(tmp_path, project_params):
    """256 class folders: classify data as usual; augment composes no scenes (their masks hold 254 classes), and
    what reads them (detect, segment) stops with that reason in one line."""
    from pipelines.datasets import load_classify, load_scenes
    from pipelines.preparation import prepare_from_classify
    from tests.fixtures import tiny_scene_params

    write_classes(tmp_path / "many", {f"c{i:03d}": 10 for i in range(256)})
    meta, raw = fetch_own(tmp_path, project_params, f"imagefolder:{tmp_path / 'many'}", image_size=8)
    assert len(meta["classes"]) == 256 and meta["splits"] == {"train": 2048, "test": 512}
    prepare_from_classify(raw, tmp_path / "prepared", tmp_path / "reports", project_params.augment,
                          tiny_scene_params(project_params), project_params.seed)
    assert len(load_classify(tmp_path / "prepared" / "classify", "val").labels) == 256
    message = one_line_error(lambda: load_scenes(tmp_path / "prepared" / "scenes", "train"))
    assert "no data here: 256 classes" in message and "at most 254" in message


# ---- masks: palette, 1-bit and 0/255 ---------------------------------------------------------------

def write_mask_pairs(root: Path, mask_for) -> None:
    """root/images/<i>.png and root/masks/<i>.png (the image saved from `mask_for(i)`'s class ids)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(5):
        mask = mask_for(i)
        Image.fromarray((np.asarray(mask.convert("L")) // 2 + 40).astype(np.uint8)).save(root / "images" / f"{i}.png")
        mask.save(root / "masks" / f"{i}.png")


def voc_mask(i: int) -> Image.Image:
    """A VOC-style palette mask: 0 background, 1 and 2 classes, 255 the ignore border, coloured by a palette."""
    ids = np.zeros((24, 24), np.uint8)
    ids[2:10, 2:10], ids[14:22, 12:20], ids[0, :] = 1, 2, 255
    mask = Image.fromarray(ids, "P")
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 252) + [224, 224, 192]
    mask.putpalette(palette)
    return mask


def test_palette_masks_are_read_by_index(tmp_path, project_params):
    write_mask_pairs(tmp_path / "voc", voc_mask)
    _, raw = fetch_own(tmp_path, project_params, f"masks:{tmp_path / 'voc'}", image_size=24)
    assert raw.classes == ["class_1", "class_2"]
    scene = next(raw.scenes("train"))
    assert sorted(scene.labels.tolist()) == [0, 1] and set(np.unique(scene.semantic)) == {0, 1, 2, 255}


def test_one_bit_masks_are_class_1(tmp_path, project_params):
    def binary(i: int) -> Image.Image:
        ids = np.zeros((24, 24), bool)
        ids[4:12, 4 + i:12 + i] = True
        return Image.fromarray(ids).convert("1")

    write_mask_pairs(tmp_path / "bin", binary)
    _, raw = fetch_own(tmp_path, project_params, f"masks:{tmp_path / 'bin'}", image_size=24)
    assert raw.classes == ["class_1"] and next(raw.scenes("train")).labels.tolist() == [0]


def test_masks_of_only_0_and_255_are_one_error_saying_how_to_write_them(tmp_path, project_params):
    def white_on_black(i: int) -> Image.Image:
        ids = np.zeros((24, 24), np.uint8)
        ids[4:12, 4:12] = 255
        return Image.fromarray(ids, "L")

    write_mask_pairs(tmp_path / "bw", white_on_black)
    message = one_line_error(lambda: fetch(data_params(project_params, dataset=f"masks:{tmp_path / 'bw'}",
                                                       image_size=24), tmp_path / "raw"))
    assert "only background (0) and 255 (the ignore value)" in message and "1..K" in message


# ---- photo sizes: data.max_pixels ----------------------------------------------------------------------

def test_a_108_mp_photo_is_read_and_one_over_data_max_pixels_is_left_out_on_one_line(tmp_path, project_params,
                                                                                     capfd):
    """Pillow's own limit (89.5 MP) left out 108 and 200 MP camera modes, with a raw DecompressionBombWarning line
    on stderr; fetch reads under data.max_pixels instead, and the service's decode keeps Pillow's limit."""
    from pipelines.decode import DecodeError, open_image

    root = tmp_path / "phone"
    write_classes(root, {"cat": 5, "dog": 5})
    photo = root / "cat" / "zz_108mp.jpg"
    Image.new("L", (12000, 9000), 90).save(photo, quality=50)
    meta, raw = fetch_own(tmp_path, project_params, f"imagefolder:{root}", image_size=8)
    assert meta["skipped"] == [] and raw.count("train") + raw.count("test") == 11
    assert "Warning" not in capfd.readouterr().err
    smaller = data_params(project_params, dataset=f"imagefolder:{root}", image_size=8, max_pixels=100_000_000)
    assert fetch(smaller, tmp_path / "raw-skip")["skipped"] == [str(photo)]
    said = "12000x9000 = 108,000,000 pixels, over data.max_pixels (100,000,000)"
    assert f"warning: skipping {photo}: {said}\n" in capfd.readouterr().err
    failing = smaller.model_copy(update={"on_corrupt": "fail"})
    message = one_line_error(lambda: fetch(failing, tmp_path / "raw-fail"))
    assert message == f"{photo}: {said}; raise data.max_pixels to read it, or set data.on_corrupt: skip"
    assert not (tmp_path / "raw-fail").exists()
    with pytest.raises(DecodeError) as info:
        open_image(photo)
    assert info.value.status == 413


@pytest.mark.parametrize("kind, size, count", [("imagefolder", 8, 10), ("masks", 24, 5)])
def test_images_and_masks_decode_under_data_max_pixels_whatever_pillows_limit(tmp_path, project_params,
                                                                              monkeypatch, kind, size, count):
    """Pillow's limit is a module global: fetch sets data.max_pixels (250 MP) for its reads, then puts Pillow's
    back."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # as if Pillow's limit were below these 10x8 and 24x24 files
    if kind == "imagefolder":
        write_classes(tmp_path / kind, {"cat": 5, "dog": 5})
    else:
        write_mask_pairs(tmp_path / kind, voc_mask)
    meta, raw = fetch_own(tmp_path, project_params, f"{kind}:{tmp_path / kind}", image_size=size)
    assert meta["skipped"] == [] and raw.count("train") + raw.count("test") == count
    assert Image.MAX_IMAGE_PIXELS == 50


def test_the_photos_own_size_reaches_the_prepared_data_and_the_served_domain(tmp_path, project_params):
    """fetch records the training photos' own size; augment carries it into the prepared meta, the loaders into the
    data, and the service's domain check compares uploads with it: a model trained at 8 px on 90 x 20 photos
    takes a 90 x 20 upload as in domain (it was '5.3x larger than the training images (8 px)' and 4.5x wider)."""
    from pipelines.datasets import load_classify
    from pipelines.preparation import prepare_from_classify
    from services.imaging import Domain, ImageFacts
    from tests.fixtures import tiny_scene_params

    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(10):
            Image.new("L", (90, 20), 60 + 100 * (name == "dog")).save(tmp_path / "pets" / name / f"{i}.png")
    _, raw = fetch_own(tmp_path, project_params, f"imagefolder:{tmp_path / 'pets'}", image_size=8)
    prepare_from_classify(raw, tmp_path / "prepared", tmp_path / "reports", project_params.augment,
                          tiny_scene_params(project_params), project_params.seed)
    data = load_classify(tmp_path / "prepared" / "classify", "train")
    assert data.source_size == {"side": 42, "aspect": 4.5} and data.subset(4, 0).source_size == data.source_size
    config = {"in_channels": 1, "image_size": 8, "mean": data.mean, "std": data.std}
    upload = ImageFacts(90, 20, False, data.mean[0])
    assert [kind for kind, _ in Domain.from_config(config).check(upload)] == ["size", "aspect"]
    assert Domain.from_config({**config, "source_size": data.source_size}).check(upload) == []
