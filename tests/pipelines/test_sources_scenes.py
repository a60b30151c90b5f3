"""pipelines/sources.py on own scene data (coco:PATH, masks:PATH) as people get it wrong or cut it short: the 255
ignore value, data.max_train over classes, colour masks, malformed COCO annotations, missing masks, duplicate
names, and the training images' own size recorded for serving."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.errors import ConvForgeError
from pipelines.params import DataParams, validate
from pipelines.raw import fetch, load_raw


def data_params(project_params, **overrides) -> DataParams:
    return validate(DataParams, {**project_params.data.model_dump(), **overrides}, prefix="data")


def fetch_own(tmp_path, project_params, dataset: str, **overrides):
    """fetch() of own data into tmp_path/raw: (meta, the opened raw data)."""
    meta = fetch(data_params(project_params, dataset=dataset, **overrides), tmp_path / "raw")
    return meta, load_raw(tmp_path / "raw")


def one_line_error(call) -> str:
    with pytest.raises(ConvForgeError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def train_classes(raw) -> set[int]:
    return {int(label) for scene in raw.scenes("train") for label in scene.labels}


# ---- COCO files written per image: (name, width, height, [(category id, polygon), ...]) --------------------

SQUARE = [2, 2, 10, 2, 10, 10, 2, 10]


def write_coco(root: Path, images: list[tuple[str, int, int, list]], categories: dict[int, str]) -> Path:
    """root/images/<name> (grey PNGs) and root/instances.json with one polygon annotation per (category, polygon);
    annotation ids are 1, 2, ... in order. Returns the instances.json path."""
    (root / "images").mkdir(parents=True)
    infos, annotations = [], []
    for index, (name, width, height, shapes) in enumerate(images):
        Image.new("L", (width, height), 60).save(root / "images" / name)
        infos.append({"id": index + 1, "file_name": name, "width": width, "height": height})
        for category, polygon in shapes:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": category,
                                "iscrowd": 0, "bbox": [2, 2, 8, 8], "segmentation": [polygon]})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": infos, "annotations": annotations,
                                "categories": [{"id": i, "name": n} for i, n in categories.items()]}))
    return path


def two_shape_coco(root: Path) -> Path:
    """Five 24x16 images, each with a 'box' (id 1, annotation 2i + 1) and a 'roof' (id 2, annotation 2i + 2)."""
    roof = [14, 12, 22, 12, 18, 4]
    return write_coco(root, [(f"{i}.png", 24, 16, [(1, SQUARE), (2, roof)]) for i in range(5)], {1: "box", 2: "roof"})


def edit_annotation(path: Path, index: int, **changes) -> None:
    instances = json.loads(path.read_text())
    instances["annotations"][index].update(changes)
    path.write_text(json.dumps(instances))


# ---- masks trees written per image: name -> class-id array --------------------------------------------------

def write_masks(root: Path, masks: dict[str, np.ndarray], image_suffix: str = ".png", classes: list[str] | None = None,
                mode: str = "L") -> None:
    """root/images/<name><image_suffix> and root/masks/<name>.png (saved in `mode`; "RGB" writes each id as a VOC
    colour); root/classes.txt when `classes` are given."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name, ids in masks.items():
        Image.fromarray((ids // 2 + 40).astype(np.uint8)).save(root / "images" / f"{name}{image_suffix}")
        if mode == "RGB":
            colours = np.array([(0, 0, 0), (128, 0, 0), (0, 128, 0)] + [(224, 224, 192)] * 253, np.uint8)
            Image.fromarray(colours[ids], "RGB").save(root / "masks" / f"{name}.png")
        else:
            Image.fromarray(ids.astype(np.uint8), "L").save(root / "masks" / f"{name}.png")
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")


def blob(value: int, side: int = 16) -> np.ndarray:
    """A side x side mask with one 6x6 square of class value `value`."""
    ids = np.zeros((side, side), np.uint8)
    ids[4:10, 4:10] = value
    return ids


# ---- 1. masks: 255 is ignored, not background -----------------------------------------------------------

def test_mask_255_stays_in_the_semantic_mask_and_is_no_class_nor_instance(tmp_path, project_params):
    def ringed(i: int) -> np.ndarray:
        ids = blob(1)
        ids[0, :] = 255          # VOC's void boundary
        ids[12:16, 12:16] = 255  # a void block, large enough to be a component
        return ids

    write_masks(tmp_path / "voc", {str(i): ringed(i) for i in range(5)}, classes=["ball"])
    _, raw = fetch_own(tmp_path, project_params, f"masks:{tmp_path / 'voc'}", image_size=16)
    assert raw.classes == ["ball"]  # classes.txt names 1 class: 255 is not counted as one
    scene = next(raw.scenes("train"))
    assert scene.labels.tolist() == [0]
    assert set(np.unique(scene.semantic)) == {0, 1, 255}
    assert (scene.semantic[0] == 255).all() and (scene.semantic[12:16, 12:16] == 255).all()


# ---- 2. data.max_train / max_test keep every class ---------------------------------------------------------

def test_spread_scenes_takes_the_class_in_fewest_chosen_scenes_in_turn():
    from pipelines.sources import spread_scenes

    classes_of = [frozenset({0}), frozenset({0}), frozenset({0, 1}), frozenset(), frozenset({2}), frozenset({2})]
    assert spread_scenes(classes_of, 3) == [0, 2, 4]  # 0: scene 0; 1: scene 2 (0 now held twice); 2: scene 4
    assert spread_scenes(classes_of, 5) == [0, 1, 2, 4, 5]
    assert spread_scenes(classes_of, 6) == list(range(6)) and spread_scenes(classes_of, None) == list(range(6))
    assert spread_scenes([frozenset(), frozenset({1}), frozenset()], 2) == [0, 1]  # no class: fills what is left


def test_max_train_on_coco_keeps_every_class(tmp_path, project_params):
    """Names sort a* (disk) before b* (square) and c* (triangle): the first 3 files would all be disks."""
    images = [(f"{prefix}{i}.png", 16, 16, [(category, SQUARE)])
              for prefix, category, count in (("a", 3, 6), ("b", 7, 4), ("c", 12, 4)) for i in range(count)]
    write_coco(tmp_path / "coco", images, {3: "disk", 7: "square", 12: "triangle"})
    meta, raw = fetch_own(tmp_path, project_params, f"coco:{tmp_path / 'coco'}", image_size=16, max_train=3,
                          max_test=2)
    assert meta["splits"] == {"train": 3, "test": 2} and train_classes(raw) == {0, 1, 2}


def test_max_train_on_masks_keeps_every_class_and_no_limit_keeps_every_pair_in_name_order(tmp_path,
                                                                                           project_params):
    masks = {f"{prefix}{i}": blob(value) for prefix, value, count in (("a", 1, 6), ("b", 2, 4), ("c", 3, 4))
             for i in range(count)}
    write_masks(tmp_path / "seg", masks)
    meta, raw = fetch_own(tmp_path, project_params, f"masks:{tmp_path / 'seg'}", image_size=16, max_train=3)
    assert meta["splits"]["train"] == 3 and train_classes(raw) == {0, 1, 2}
    meta = fetch(data_params(project_params, dataset=f"masks:{tmp_path / 'seg'}", image_size=16), tmp_path / "all")
    scenes = list(load_raw(tmp_path / "all").scenes("train"))
    flat_train = [name for i, name in enumerate(sorted(masks)) if i % 5 != 4]
    assert [Path(s.sources[0]).stem for s in scenes] == flat_train


# ---- 3. colour masks, and the classes.txt count --------------------------------------------------------------

def test_rgb_colour_mask_is_one_error_naming_it(tmp_path, project_params):
    root = tmp_path / "voc"
    write_masks(root, {str(i): blob(1 + i % 2) for i in range(5)}, mode="RGB")
    message = one_line_error(lambda: fetch(data_params(project_params, dataset=f"masks:{root}", image_size=16),
                                           tmp_path / "raw"))
    assert message.startswith(f"{root / 'masks' / '0.png'}: a colour (RGB) mask")
    assert "grey (L) or palette (P) PNG" in message


def test_grey_values_saved_as_rgb_are_read_as_class_ids(tmp_path, project_params):
    root = tmp_path / "grey"
    write_masks(root, {str(i): blob(1 + i % 2) for i in range(5)})
    for path in (root / "masks").iterdir():
        Image.open(path).convert("RGB").save(path)
    _, raw = fetch_own(tmp_path, project_params, f"masks:{root}", image_size=16)
    assert raw.classes == ["class_1", "class_2"]


def test_classes_txt_count_error_names_a_mask_holding_the_value(tmp_path, project_params):
    root = tmp_path / "seg"
    write_masks(root, {str(i): blob(3 if i == 2 else 1) for i in range(5)}, classes=["ball"])
    message = one_line_error(lambda: fetch(data_params(project_params, dataset=f"masks:{root}", image_size=16),
                                           tmp_path / "raw"))
    assert f"names 1 classes but {root / 'masks' / '2.png'} has value 3" in message


# ---- 4. malformed COCO annotations: named by id, dropped under skip ------------------------------------------

MALFORMED = [
    ({"segmentation": [[1, 2, 3, 4]]}, "a polygon of 4 numbers"),  # pycocotools reads 4 numbers as a box
    ({"segmentation": [1, 2, 3, 4, 5, 6]}, "segmentation is a flat list of numbers"),
    ({"segmentation": [[1, 2, 3, 4, 5, 6, 7]]}, "a polygon of 7 numbers"),
    ({"category_id": "1"}, "category_id \"1\" (a string) names no category; the categories use 1"),
    ({"category_id": 9}, "category_id 9 names no category"),
    ({"segmentation": {"counts": "abc", "size": [16]}}, "an RLE's size [16] is not [height, width]"),
    ({"segmentation": [], "bbox": None}, "neither a segmentation nor a bbox"),
]


@pytest.mark.parametrize("change, says", MALFORMED)
def test_malformed_coco_annotation_stops_fetch_under_fail_naming_its_id(tmp_path, project_params, change, says):
    path = two_shape_coco(tmp_path / "coco")
    edit_annotation(path, 2, **change)  # annotation 3: the box of 1.png
    message = one_line_error(lambda: fetch_own(tmp_path, project_params, f"coco:{tmp_path / 'coco'}",
                                               image_size=24, on_corrupt="fail"))
    assert message.startswith(f"{path}: image 1.png: annotation 3: ") and says in message
    assert message.endswith("; fix or remove it, or set data.on_corrupt: skip")


@pytest.mark.parametrize("change, says", MALFORMED)
def test_malformed_coco_annotation_is_dropped_under_skip_with_one_warning(tmp_path, project_params, capsys,
                                                                         change, says):
    path = two_shape_coco(tmp_path / "coco")
    edit_annotation(path, 2, **change)
    meta, raw = fetch_own(tmp_path, project_params, f"coco:{tmp_path / 'coco'}", image_size=24, on_corrupt="skip")
    warnings = re.findall(r"warning: [^\r\n]*", capsys.readouterr().err)  # progress bars share stderr
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: dropping {path}: image 1.png: annotation 3: ")
    assert says in warnings[0] and meta["skipped"] == []
    scenes = list(raw.scenes("train"))  # 0.png, 1.png, 2.png, 3.png: the box of 1.png is gone, its roof kept
    assert [sorted(s.labels.tolist()) for s in scenes] == [[0, 1], [1], [0, 1], [0, 1]]


def test_rle_of_another_size_than_its_image_names_the_annotation_and_both_sizes(tmp_path, project_params):
    """Counts for the image's 24x16 with a size of [10, 10] (pycocotools: 'Invalid RLE mask representation')."""
    from pipelines.coco import encode_mask

    path = two_shape_coco(tmp_path / "coco")
    rle = encode_mask(np.ones((16, 24), bool))
    edit_annotation(path, 2, segmentation={**rle, "size": [10, 10]})
    message = one_line_error(lambda: fetch_own(tmp_path, project_params, f"coco:{tmp_path / 'coco'}", image_size=24))
    assert message.startswith(f"{path}: image 1.png: annotation 3's segmentation is 10x10, its image 24x16")


# ---- 5. masks: a missing mask, a JPEG mask -------------------------------------------------------------------

def test_a_missing_mask_is_said_as_such_and_a_jpeg_one_is_named(tmp_path, project_params, capsys):
    root = tmp_path / "seg"
    write_masks(root, {str(i): blob(1) for i in range(6)})
    (root / "masks" / "4.png").unlink()
    Image.open(root / "masks" / "5.png").save(root / "masks" / "5.jpg")
    (root / "masks" / "5.png").unlink()
    meta, _ = fetch_own(tmp_path, project_params, f"masks:{root}", image_size=16, on_corrupt="skip")
    err = capsys.readouterr().err
    assert f"warning: skipping {root / 'images' / '4.png'}: no mask masks/4.png\n" in err
    assert (f"warning: skipping {root / 'images' / '5.png'}: no mask masks/5.png (found masks/5.jpg: masks must be "
            "PNG, lossless)\n") in err
    assert meta["skipped"] == [str(root / "images" / "5.png"), str(root / "images" / "4.png")]  # 4.png: test


def test_when_no_training_image_has_its_mask_the_error_says_so(tmp_path, project_params):
    root = tmp_path / "seg"
    write_masks(root, {str(i): blob(1) for i in range(5)})
    for path in sorted((root / "masks").iterdir()):
        Image.open(path).convert("RGB").save(path.with_suffix(".jpg"))
        path.unlink()
    message = one_line_error(lambda: fetch(data_params(project_params, dataset=f"masks:{root}", image_size=16),
                                           tmp_path / "raw"))
    assert message == (f"{root}: no training image has its mask in masks/ (images/NAME.* needs masks/NAME.png); "
                       "the first: no mask masks/0.png (found masks/0.jpg: masks must be PNG, lossless)")


# ---- 6. duplicate category names, images sharing a name ------------------------------------------------------

def test_two_categories_of_one_name_are_one_error_naming_both(tmp_path, project_params):
    path = two_shape_coco(tmp_path / "coco")
    instances = json.loads(path.read_text())
    instances["categories"][1]["name"] = "box"
    path.write_text(json.dumps(instances))
    message = one_line_error(lambda: fetch_own(tmp_path, project_params, f"coco:{tmp_path / 'coco'}", image_size=24))
    assert message.startswith(f"{path}: categories id 1 and 2 share the name \"box\"")


def test_two_images_of_one_name_in_a_masks_tree_are_one_error_naming_both(tmp_path, project_params):
    root = tmp_path / "seg"
    write_masks(root, {str(i): blob(1) for i in range(5)})
    Image.open(root / "images" / "3.png").convert("RGB").save(root / "images" / "3.jpg")
    message = one_line_error(lambda: fetch(data_params(project_params, dataset=f"masks:{root}", image_size=16),
                                           tmp_path / "raw"))
    assert message.startswith(f"{root / 'images'}: 3.jpg and 3.png share the name 3")


# ---- 7. the training images' own size, for the serving domain check ------------------------------------------

def test_own_data_meta_records_the_training_images_own_size(tmp_path, project_params):
    """Train (flat: every 5th is test) is 0, 1, 2, 3 and 5: sqrt(w * h) 40, 20, 60 (EXIF 6: upright 40x90), 29.7, 20
    -> median 30; aspects 2.56, 1, 4/9, 20/11, 1 -> median 1. The 100x100 test image is not counted."""
    sizes = [(64, 25), (20, 20), (90, 40), (40, 22), (100, 100), (20, 20)]
    root = tmp_path / "coco"
    write_coco(root, [(f"{i}.png", w, h, [(1, SQUARE)]) for i, (w, h) in enumerate(sizes)],
               {1: "box"})
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 90x40, shown 40x90
    Image.new("RGB", (90, 40)).save(root / "images" / "2.jpg", exif=exif.tobytes())
    (root / "images" / "2.png").unlink()
    instances = json.loads((root / "instances.json").read_text())
    instances["images"][2].update(file_name="2.jpg", width=40, height=90)
    (root / "instances.json").write_text(json.dumps(instances))
    meta, _ = fetch_own(tmp_path, project_params, f"coco:{root}", image_size=32)
    assert meta["splits"] == {"train": 5, "test": 1}
    assert meta["source_size"] == {"side": 30, "aspect": 1.0}


def test_masks_and_imagefolder_record_their_own_size_and_builtin_data_none(tmp_path, project_params):
    write_masks(tmp_path / "seg", {str(i): np.pad(blob(1), ((0, 0), (0, 8))) for i in range(5)})  # 24x16
    meta, _ = fetch_own(tmp_path, project_params, f"masks:{tmp_path / 'seg'}", image_size=16)
    assert meta["source_size"] == {"side": 20, "aspect": 1.5}
    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(5):
            Image.new("L", (30, 10), 90).save(tmp_path / "pets" / name / f"{i}.png")
    meta = fetch(data_params(project_params, dataset=f"imagefolder:{tmp_path / 'pets'}", image_size=8),
                 tmp_path / "items")
    assert meta["source_size"] == {"side": 17, "aspect": 3.0}
    assert "source_size" not in fetch(data_params(project_params, dataset="digits"), tmp_path / "digits")
