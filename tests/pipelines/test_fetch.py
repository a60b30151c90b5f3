"""The fetch stage's readers on small real files the tests write: IDX (Debian layout), ImageFolder, COCO, masks."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines.errors import ConvForgeError
from pipelines.params import DataParams, validate
from pipelines.raw import fetch
from pipelines.runtime import sha256_file
from pipelines.sources import (DEBIAN_FASHION_MNIST, read_dataset, read_digits, read_fashion_mnist)

ROOT = Path(__file__).resolve().parents[2]


def data_params(project_params, **overrides) -> DataParams:
    return validate(DataParams, {**project_params.data.model_dump(), **overrides}, prefix="data")


# ---- fashion-mnist (Debian layout) -----------------------------------------------------------

def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> dict[str, str]:
    """Write gzip'd IDX files as the Debian package ships them; returns the MD5s of the IDX bytes."""
    image_bytes = struct.pack(">IIII", 0x803, *images.shape) + images.tobytes()
    label_bytes = struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes()
    md5 = {}
    for name, payload in ((f"{prefix}-images-idx3-ubyte", image_bytes), (f"{prefix}-labels-idx1-ubyte", label_bytes)):
        (folder / f"{name}.gz").write_bytes(gzip.compress(payload, mtime=0))
        md5[name] = hashlib.md5(payload).hexdigest()
    return md5


@pytest.fixture
def debian_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    arrays = {"train": (rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), np.arange(12) % 10),
              "t10k": (rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.arange(5) % 10)}
    md5 = {}
    for prefix, (images, labels) in arrays.items():
        md5.update(write_idx(folder, prefix, images, labels))
    return folder, md5, arrays


def test_fashion_mnist_from_debian_layout(debian_dir, project_params):
    folder, md5, arrays = debian_dir
    data = data_params(project_params, download=False)
    splits = read_fashion_mnist(data, debian_dir=folder, idx_md5=md5)
    assert splits.train_images.shape == (12, 28, 28, 1) and splits.test_images.shape == (5, 28, 28, 1)
    np.testing.assert_array_equal(splits.train_images[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(splits.test_labels, arrays["t10k"][1])
    assert splits.classes[0] == "T-shirt/top" and len(splits.classes) == 10


def test_fashion_mnist_checksum_mismatch_is_one_clear_error(debian_dir, project_params):
    folder, md5, _ = debian_dir
    wrong = {name: "0" * 32 for name in md5}
    with pytest.raises(ConvForgeError, match="checksum mismatch.*apt-get install --reinstall"):
        read_fashion_mnist(data_params(project_params, download=False), debian_dir=folder, idx_md5=wrong)


def test_missing_fashion_mnist_names_both_ways(tmp_path, project_params):
    data = data_params(project_params, download=False, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConvForgeError) as exc:
        read_fashion_mnist(data, debian_dir=tmp_path / "absent")
    message = str(exc.value)
    assert "apt-get install dataset-fashion-mnist" in message and "data.download: true" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_torchvision_datasets_without_download_give_clear_error(tmp_path, project_params, name):
    data = data_params(project_params, dataset=name, download=False, cache_dir=str(tmp_path))
    with pytest.raises(ConvForgeError, match=f"{name} is not in .* data.download is false"):
        read_dataset(data)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_debian_fashion_mnist(project_params):
    data = data_params(project_params, max_train=50, max_test=20)
    splits = read_fashion_mnist(data)
    assert splits.train_images.shape == (50, 28, 28, 1) and splits.test_labels.shape == (20,)
    assert splits.train_labels.max() <= 9 and splits.train_images.max() > 200


# ---- digits and the stage's outputs ----------------------------------------------------------

def test_digits_stratified_and_scaled(project_params):
    splits = read_digits(data_params(project_params, dataset="digits"))
    assert splits.train_images.shape[1:] == (8, 8, 1) and splits.train_images.dtype == np.uint8
    assert splits.train_images.max() == 255
    assert len(splits.train_labels) + len(splits.test_labels) == 1797
    train_share = np.bincount(splits.train_labels, minlength=10) / len(splits.train_labels)
    test_share = np.bincount(splits.test_labels, minlength=10) / len(splits.test_labels)
    assert np.abs(train_share - test_share).max() < 0.02


def test_fetch_writes_meta_with_checksums(tmp_path, project_params):
    meta = fetch(data_params(project_params, dataset="digits", max_train=100, max_test=30), tmp_path / "raw")
    assert meta["kind"] == "classify" and meta["splits"] == {"train": 100, "test": 30}
    assert meta["in_channels"] == 1 and meta["image_size"] == [8, 8] and meta["skipped"] == []
    on_disk = json.loads((tmp_path / "raw" / "meta.json").read_text())
    assert on_disk == meta
    assert set(meta["checksums"]) == {f"{split}/{name}.npy" for split in ("train", "test")
                                      for name in ("images", "labels")}
    for name, digest in meta["checksums"].items():
        assert sha256_file(tmp_path / "raw" / name) == digest
    assert np.load(tmp_path / "raw" / "train" / "images.npy").shape == (100, 8, 8, 1)
    assert np.load(tmp_path / "raw" / "train" / "labels.npy").dtype == np.int64


# ---- own data: ImageFolder ---------------------------------------------------------------------

def write_imagefolder(root: Path, rgb: bool = True) -> None:
    rng = np.random.default_rng(1)
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(5):
            size = (20 + 3 * i, 14 + 2 * c)  # different sizes and aspect ratios
            if rgb and i == 0:
                image = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8), "RGB")
            else:
                image = Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), "L")
            image.save(root / name / f"{i:02d}.png")


def fetch_own(tmp_path, project_params, dataset: str, **overrides):
    """fetch() of own data into tmp_path/raw: (meta, the opened raw data)."""
    from pipelines.raw import load_raw

    meta = fetch(data_params(project_params, dataset=dataset, **overrides), tmp_path / "raw")
    return meta, load_raw(tmp_path / "raw")


def test_imagefolder_flat_split_resize_and_channels(tmp_path, project_params):
    write_imagefolder(tmp_path / "pets")
    meta, raw = fetch_own(tmp_path, project_params, f"imagefolder:{tmp_path / 'pets'}", image_size=16)
    assert raw.classes == ["cat", "dog"] and meta["in_channels"] == 3 and meta["image_size"] == [16, 16]
    assert np.load(raw.images_path("train")).shape == (8, 16, 16, 3)
    assert np.load(raw.images_path("test")).shape == (2, 16, 16, 3)
    assert list(raw.labels("test")) == [0, 1]  # every 5th per class


def test_imagefolder_all_gray_keeps_one_channel_and_presplit(tmp_path, project_params):
    write_imagefolder(tmp_path / "pets" / "train", rgb=False)
    write_imagefolder(tmp_path / "pets" / "test", rgb=False)
    _, raw = fetch_own(tmp_path, project_params, f"imagefolder:{tmp_path / 'pets'}", image_size=12)
    assert np.load(raw.images_path("train")).shape == (10, 12, 12, 1)
    assert np.load(raw.images_path("test")).shape == (10, 12, 12, 1)


def test_imagefolder_auto_size_is_the_capped_median_shorter_side(tmp_path, project_params):
    write_imagefolder(tmp_path / "pets")  # shorter sides 14 and 16: median 15, a multiple of 8 below
    meta, _ = fetch_own(tmp_path, project_params, f"imagefolder:{tmp_path / 'pets'}", image_size="auto")
    assert meta["image_size"] == [8, 8] and meta["params"]["image_size"] == "auto"
    for i, side in enumerate((300, 500, 900)):
        big = tmp_path / "big" / "ab"[i % 2]
        big.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (side + 50, side)).save(big / f"{i}.jpg")
    (tmp_path / "raw2").mkdir()
    meta = fetch(data_params(project_params, dataset=f"imagefolder:{tmp_path / 'big'}", image_size="auto",
                             auto_size_max=224), tmp_path / "raw2" / "raw")
    assert meta["image_size"] == [224, 224]


def test_fetch_decodes_one_image_at_a_time(tmp_path, project_params, monkeypatch):
    """Streaming: each decoded image is written before the next is opened (never a split in memory)."""
    import tracemalloc

    import pipelines.sources as sources

    for name in "ab":
        (tmp_path / "photos" / name).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(50):
        image = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
        image.save(tmp_path / "photos" / "ab"[i % 2] / f"{i:02d}.png")
    live, most = [0], [0]
    real = sources.decode

    def counting(*args, **kwargs):
        live[0] += 1
        most[0] = max(most[0], live[0])
        try:
            return real(*args, **kwargs)
        finally:
            live[0] -= 1

    monkeypatch.setattr(sources, "decode", counting)
    tracemalloc.start()
    fetch(data_params(project_params, dataset=f"imagefolder:{tmp_path / 'photos'}", image_size=32), tmp_path / "raw")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert most[0] == 1
    # one 400x300 RGB image is 360 kB; 50 of them would be 18 MB
    assert peak < 6 * 400 * 300 * 3, peak


def test_corrupt_image_skip_and_fail(tmp_path, project_params):
    write_imagefolder(tmp_path / "pets")
    bad = tmp_path / "pets" / "dog" / "zz_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    meta, raw = fetch_own(tmp_path, project_params, f"imagefolder:{tmp_path / 'pets'}", on_corrupt="skip")
    assert meta["skipped"] == [str(bad)]
    assert len(raw.labels("train")) + len(raw.labels("test")) == 10
    with pytest.raises(ConvForgeError, match="zz_broken.png: unreadable image .*data.on_corrupt: skip"):
        fetch(data_params(project_params, dataset=f"imagefolder:{tmp_path / 'pets'}", on_corrupt="fail"),
              tmp_path / "raw-fail")


def test_missing_own_data_folder(tmp_path, project_params):
    with pytest.raises(ConvForgeError, match="no such folder"):
        fetch(data_params(project_params, dataset=f"masks:{tmp_path / 'nothing'}"), tmp_path / "raw")


# ---- own data: COCO and masks ------------------------------------------------------------------

def write_coco(root: Path, count: int = 5) -> None:
    """Images 40x30 with one square 'box' and one triangle 'roof' each, polygon annotations."""
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(count):
        array = np.zeros((30, 40, 3), np.uint8)
        array[5:15, 4 + i:14 + i] = (200, 50, 50)
        Image.fromarray(array).save(root / "images" / f"img{i}.png")
        images.append({"id": i + 10, "file_name": f"img{i}.png", "height": 30, "width": 40})
        annotations.append({"id": 2 * i + 1, "image_id": i + 10, "category_id": 7, "iscrowd": 0, "area": 100,
                            "bbox": [4 + i, 5, 10, 10],
                            "segmentation": [[4 + i, 5, 14 + i, 5, 14 + i, 15, 4 + i, 15]]})
        annotations.append({"id": 2 * i + 2, "image_id": i + 10, "category_id": 3, "iscrowd": 0, "area": 50,
                            "bbox": [20, 18, 10, 10], "segmentation": [[20, 28, 30, 28, 25, 18]]})
    categories = [{"id": 3, "name": "roof"}, {"id": 7, "name": "box"}]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                     "categories": categories}))


def test_coco_folder(tmp_path, project_params):
    write_coco(tmp_path / "coco")
    meta, raw = fetch_own(tmp_path, project_params, f"coco:{tmp_path / 'coco'}", image_size=20)
    assert raw.classes == ["roof", "box"] and meta["in_channels"] == 3
    assert raw.count("train") == 4 and raw.count("test") == 1
    for scene in [*raw.scenes("train"), *raw.scenes("test")]:
        assert scene.image.shape == (20, 20, 3) and scene.semantic.shape == (20, 20)
        assert sorted(scene.labels.tolist()) == [0, 1]
        for mask, box in zip(scene.instance_masks, scene.boxes):
            ys, xs = np.nonzero(mask)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert scene.semantic[20 // 2 + 5:, :].max() == 0  # letterbox: 40x30 -> 20x15, bottom rows padded


def edit_instances(root: Path, edit) -> Path:
    """Rewrite root/instances.json with `edit(instances)` applied; returns its path."""
    path = root / "instances.json"
    instances = json.loads(path.read_text())
    path.write_text(json.dumps(edit(instances)))
    return path


def test_box_only_coco_annotations_use_their_box_as_the_mask(tmp_path, project_params):
    def box_only(instances):  # detection-only exporters: no segmentation key, or an empty one
        del instances["annotations"][1]["segmentation"]  # img0's roof, a triangle inside [20, 18, 10, 10]
        instances["annotations"].append({"id": 99, "image_id": 10, "category_id": 3, "iscrowd": 0, "area": 100,
                                         "bbox": [35, 25, 10, 10], "segmentation": []})  # past the corner
        return instances

    write_coco(tmp_path / "coco")
    edit_instances(tmp_path / "coco", box_only)
    _, raw = fetch_own(tmp_path, project_params, f"coco:{tmp_path / 'coco'}", image_size=40)
    scene = next(raw.scenes("train"))  # img0 at its own size: 40x30 on a 40x40 canvas
    roofs = {tuple(box.tolist()): int(mask.sum()) for mask, box, label
             in zip(scene.instance_masks, scene.boxes, scene.labels) if label == 0}
    assert roofs == {(20, 18, 30, 28): 100, (35, 25, 40, 30): 25}  # filled boxes, the second clipped


def rle_of_another_size(instances):
    from pipelines.coco import encode_mask

    instances["annotations"][0]["segmentation"] = encode_mask(np.ones((20, 20), bool))
    return instances


@pytest.mark.parametrize("edit, says", [
    (lambda instances: [instances], "its top level is a JSON list"),
    (lambda instances: {**instances, "categories": [{"id": 3, "name": "roof"}, {"id": 7}]},
     r"categories\[1\] \(id 7\) has no name"),
    (lambda instances: {**instances, "images": [{k: v for k, v in i.items() if k != "file_name"}
                                                for i in instances["images"]]},
     r"images\[0\] \(id 10\) has no file_name"),
    (rle_of_another_size, "image img0.png: annotation 1's segmentation is 20x20, its image 40x30"),
    # pycocotools went on silently: an annotation of no image was never read, an image listed twice read twice
    (lambda instances: {**instances, "annotations": [{**instances["annotations"][0], "image_id": 99},
                                                     *instances["annotations"][1:]]},
     r"annotations\[0\] \(id 1\) has image_id 99, which names no image"),
    (lambda instances: {**instances, "images": [*instances["images"], {**instances["images"][0], "id": 50}]},
     r"images\[5\] repeats the file_name 'img0.png' of images\[0\]"),
    (lambda instances: {**instances, "images": [*instances["images"], {**instances["images"][0], "file_name": "x"}]},
     r"images\[5\] repeats the id 10 of images\[0\]"),
    (lambda instances: {**instances, "annotations": [*instances["annotations"], instances["annotations"][0]]},
     r"annotations\[10\] repeats the id 1 of annotations\[0\]"),
    (lambda instances: {**instances, "images": [{**instances["images"][0], "file_name": 5}]},
     r"images\[0\] \(id 10\) has file_name 5, expected a string"),
])
def test_malformed_coco_files_are_one_error_naming_the_file(tmp_path, project_params, edit, says):
    write_coco(tmp_path / "coco")
    path = edit_instances(tmp_path / "coco", edit)
    with pytest.raises(ConvForgeError, match=says) as info:
        fetch_own(tmp_path, project_params, f"coco:{tmp_path / 'coco'}", image_size=20)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_coco_with_more_categories_than_scene_masks_hold_is_one_error(tmp_path, project_params):
    def many(instances):
        instances["categories"] += [{"id": 100 + i, "name": f"c{i}"} for i in range(298)]
        instances["annotations"][0]["category_id"] = 397  # the last class: value 300 in a uint8 mask
        return instances

    write_coco(tmp_path / "coco")
    path = edit_instances(tmp_path / "coco", many)
    with pytest.raises(ConvForgeError, match="300 classes; scenes .* at most 254") as info:
        fetch_own(tmp_path, project_params, f"coco:{tmp_path / 'coco'}", image_size=20)
    assert str(info.value).startswith(str(path))


def test_hidden_files_beside_a_coco_file_are_skipped(tmp_path, project_params):
    write_coco(tmp_path / "coco")
    (tmp_path / "coco" / "instances.json").rename(tmp_path / "coco" / "_annotations.coco.json")  # Roboflow's name
    (tmp_path / "coco" / "._annotations.coco.json").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS copies
    meta, raw = fetch_own(tmp_path, project_params, f"coco:{tmp_path / 'coco'}", image_size=20)
    assert meta["skipped"] == [] and raw.count("train") + raw.count("test") == 5


def test_exif_rotated_image_whose_annotations_are_not_upright_is_skipped(tmp_path, project_params):
    write_coco(tmp_path / "coco")
    image = Image.open(tmp_path / "coco" / "images" / "img0.png").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 30x40 upright, while the annotations say 40x30
    image.save(tmp_path / "coco" / "images" / "img0.jpg", exif=exif.tobytes())
    instances = json.loads((tmp_path / "coco" / "instances.json").read_text())
    instances["images"][0]["file_name"] = "img0.jpg"
    (tmp_path / "coco" / "instances.json").write_text(json.dumps(instances))
    meta, raw = fetch_own(tmp_path, project_params, f"coco:{tmp_path / 'coco'}", image_size=20)
    assert any(path.endswith("img0.jpg") for path in meta["skipped"])
    assert raw.count("train") + raw.count("test") == 4


def test_coco_presplit_folders(tmp_path, project_params):
    write_coco(tmp_path / "coco" / "train", count=3)
    write_coco(tmp_path / "coco" / "test", count=2)
    _, raw = fetch_own(tmp_path, project_params, f"coco:{tmp_path / 'coco'}", image_size=20, max_train=2)
    assert (raw.count("train"), raw.count("test")) == (2, 2)
    assert [s.image_id for s in raw.scenes("test")] == [1, 2]


def test_coco_stage_output_roundtrip(tmp_path, project_params):
    from pipelines.coco import read_split

    write_coco(tmp_path / "coco")
    meta = fetch(data_params(project_params, dataset=f"coco:{tmp_path / 'coco'}", image_size=20), tmp_path / "raw")
    assert meta["kind"] == "coco" and meta["splits"] == {"train": 4, "test": 1} and meta["image_size"] == [20, 20]
    assert "train/instances.json" in meta["checksums"] and "train/images/000001.png" in meta["checksums"]
    scenes, classes = read_split(tmp_path / "raw" / "train")
    assert classes == ["roof", "box"] and len(scenes) == 4


def test_masks_folder_instances_from_components(tmp_path, project_params):
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("road\ncar\n")
    for i in range(5):
        mask = np.zeros((24, 24), np.uint8)
        mask[2:8, 2:8] = 2      # car
        mask[14:20, 14:20] = 2  # another car (separate component)
        mask[2:6, 16:22] = 1    # road
        mask[0, 23] = 255       # ignore label, kept as 255
        Image.fromarray((mask * 60).astype(np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    (root / "images" / "orphan.png").write_bytes((root / "images" / "0.png").read_bytes())  # has no mask
    meta, raw = fetch_own(tmp_path, project_params, f"masks:{root}", image_size=24, on_corrupt="skip")
    assert raw.classes == ["road", "car"] and meta["in_channels"] == 1
    assert meta["skipped"] == [str(root / "images" / "orphan.png")]
    assert raw.count("train") + raw.count("test") == 5
    scene = next(raw.scenes("train"))
    assert sorted(scene.labels.tolist()) == [0, 1, 1]
    assert scene.semantic[scene.semantic != 255].max() == 2 and scene.semantic[0, 23] == 255


# ---- the stage as a process --------------------------------------------------------------------

def test_stage_exits_2_with_one_line(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["dataset"] = f"imagefolder:{tmp_path / 'nowhere'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "pipelines.stages.fetch"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: data.dataset imagefolder:{tmp_path / 'nowhere'}: "
                                                  f"no such folder"]
    assert not (tmp_path / "data" / "raw").exists()
