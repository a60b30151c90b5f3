"""Own regression targets (pipelines/targets.py): an ImageFolder tree (class folders, or photos lying directly in
it) with a CSV through fetch and augment to the regress task's splits, and the one-line errors of bad CSVs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.errors import ConvForgeError
from pipelines.params import DataParams, validate
from pipelines.raw import fetch, load_raw
from pipelines.regression import load_regress
from pipelines.targets import read_targets_csv
from pipelines.tasks import get_task


def write_tree(root: Path, count: int = 20, folder: str = "shapes") -> dict[str, tuple[float, float]]:
    """root/<folder>/<i>.png ("": root/<i>.png), grey squares whose brightness and size are the targets; returns
    the rows."""
    rows = {}
    (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = np.zeros((12, 12), np.uint8)
        image[2:4 + i % 8, 2:10] = 40 + 10 * i
        Image.fromarray(image).save(root / folder / f"{i}.png")
        rows[(Path(folder) / f"{i}.png").as_posix()] = (float(40 + 10 * i), float(2 + i % 8))
    return rows


def write_csv(path: Path, rows: dict[str, tuple[float, ...]], header: str = "file,brightness,height") -> Path:
    path.write_text(header + "\n" + "".join(f"{name},{','.join(map(str, values))}\n" for name, values in rows.items()))
    return path


@pytest.mark.parametrize("folders, classes", [(("shapes",), "1 class folder (shapes)"),
                                              (("",), "no class folders"),  # photos lying directly in the folder
                                              (("train", "test"), "no class folders")])
def test_targets_follow_their_images_through_fetch_and_augment(tmp_path, project_params, capfd, folders, classes):
    from pipelines.preparation import prepare_from_classify
    from tests.fixtures import tiny_scene_params

    rows = {name: values for folder in folders for name, values in write_tree(tmp_path / "tree", folder=folder).items()}
    csv = write_csv(tmp_path / "tree" / "targets.csv", dict(reversed(list(rows.items()))))  # any row order
    data = validate(DataParams, {**project_params.data.model_dump(), "dataset": f"imagefolder:{tmp_path / 'tree'}",
                                 "image_size": 12, "targets_csv": str(csv)}, prefix="data")
    meta = fetch(data, tmp_path / "raw")
    assert meta["target_names"] == ["brightness", "height"]
    err = capfd.readouterr().err
    assert f"note: {tmp_path / 'tree'}: {classes}: regress (data.targets_csv) and reconstruct train on these " \
           "images; classify needs at least 2 class folders (<class>/<image>)" in err
    assert "warning" not in err  # the CSV beside the images is no stray file
    augment = project_params.augment.model_copy(update={"val_fraction": 0.25})
    prepare_from_classify(load_raw(tmp_path / "raw"), tmp_path / "prepared", tmp_path / "reports", augment,
                          tiny_scene_params(project_params, train_scenes=2, val_scenes=1, test_scenes=1),
                          project_params.seed)
    seen = 0
    for split in ("train", "val", "test"):
        split_data = load_regress(tmp_path / "prepared" / "classify", split)
        assert split_data.classes == ["brightness", "height"]
        for image, (brightness, height) in zip(split_data.images, split_data.values.tolist()):
            assert int(image.max()) == brightness  # the row of this very image
            assert int((image[0, :, 5] > 0).sum()) == height
            seen += 1
    assert seen == len(rows)
    # the classify stages on the same data: one line, not torchmetrics' traceback on one class
    with pytest.raises(ConvForgeError, match=r"classify needs at least 2 classes, this data has \[.*\]: run the "
                                             r"stages of the tasks it has alone") as caught:
        get_task("classify").load_split(tmp_path / "prepared" / "classify", "train")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("text, message", [
    ("name,angle\na.png,1\n", "first row must be the header"),
    ("file\na.png\n", "first row must be the header"),
    ("file,angle\na.png,1,2\n", r"targets.csv:2: 3 columns, expected 2"),
    ("file,angle\na.png,up\n", r"targets.csv:2: a target is not a number"),
    ("file,angle\na.png,nan\n", r"targets.csv:2: targets must be finite"),
    ("file,angle\na.png,1\na.png,2\n", r"targets.csv:3: a.png has a second row"),
    ("file,angle\n", "no rows after the header"),
])
def test_bad_csvs_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "targets.csv").write_text(text)
    with pytest.raises(ConvForgeError, match=message) as caught:
        read_targets_csv(tmp_path / "targets.csv")
    assert "\n" not in str(caught.value)


def test_excel_csv_utf8_with_a_byte_order_mark_reads(tmp_path):
    (tmp_path / "targets.csv").write_text("file,angle\nshapes/0.png,1.5\n", encoding="utf-8-sig")
    assert read_targets_csv(tmp_path / "targets.csv") == (["angle"], {"shapes/0.png": [1.5]})


def test_photos_without_class_folders_and_without_a_csv_are_one_error_naming_targets_csv(tmp_path, project_params):
    write_tree(tmp_path / "tree", count=6, folder="")
    data = validate(DataParams, {**project_params.data.model_dump(), "dataset": f"imagefolder:{tmp_path / 'tree'}",
                                 "image_size": 12}, prefix="data")
    with pytest.raises(ConvForgeError, match="no class folders .*read for regress, with data.targets_csv") as caught:
        fetch(data, tmp_path / "raw")
    assert "\n" not in str(caught.value)


def test_an_image_without_a_row_and_a_missing_csv_are_errors(tmp_path, project_params):
    rows = write_tree(tmp_path / "tree", count=6)
    csv = write_csv(tmp_path / "targets.csv", dict(list(rows.items())[1:]))
    base = {**project_params.data.model_dump(), "dataset": f"imagefolder:{tmp_path / 'tree'}", "image_size": 12}
    with pytest.raises(ConvForgeError, match="no row for shapes/0.png"):
        fetch(validate(DataParams, {**base, "targets_csv": str(csv)}, prefix="data"), tmp_path / "raw")
    with pytest.raises(ConvForgeError, match="no such file"):
        fetch(validate(DataParams, {**base, "targets_csv": str(tmp_path / "none.csv")}, prefix="data"),
              tmp_path / "raw")
    with pytest.raises(ConvForgeError, match="targets_csv: only for data.dataset imagefolder"):
        validate(DataParams, {**base, "dataset": "digits", "targets_csv": str(csv)}, prefix="data")
