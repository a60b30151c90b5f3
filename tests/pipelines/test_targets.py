"""Own regression targets (pipelines/targets.py): an ImageFolder tree with a CSV through fetch and augment
to the regress task's splits, and the one-line errors of bad CSVs."""

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


def write_tree(root: Path, count: int = 20) -> dict[str, tuple[float, float]]:
    """root/shapes/<i>.png, grey squares whose brightness and size are the targets; returns the rows."""
    rows = {}
    (root / "shapes").mkdir(parents=True)
    for i in range(count):
        image = np.zeros((12, 12), np.uint8)
        image[2:4 + i % 8, 2:10] = 40 + 10 * i
        Image.fromarray(image).save(root / "shapes" / f"{i}.png")
        rows[f"shapes/{i}.png"] = (float(40 + 10 * i), float(2 + i % 8))
    return rows


def write_csv(path: Path, rows: dict[str, tuple[float, ...]], header: str = "file,brightness,height") -> Path:
    path.write_text(header + "\n" + "".join(f"{name},{','.join(map(str, values))}\n" for name, values in rows.items()))
    return path


def test_targets_follow_their_images_through_fetch_and_augment(tmp_path, project_params):
    from pipelines.preparation import prepare_from_classify
    from tests.fixtures import tiny_scene_params

    rows = write_tree(tmp_path / "tree")
    csv = write_csv(tmp_path / "targets.csv", dict(reversed(list(rows.items()))))  # any row order
    data = validate(DataParams, {**project_params.data.model_dump(), "dataset": f"imagefolder:{tmp_path / 'tree'}",
                                 "image_size": 12, "targets_csv": str(csv)}, prefix="data")
    meta = fetch(data, tmp_path / "raw")
    assert meta["target_names"] == ["brightness", "height"]
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
