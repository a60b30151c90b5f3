"""Own regression targets (`data.targets_csv`): the CSV reader the fetch stage uses, and the targets the
augment stage writes beside the prepared items ({split}/targets.npy, names in meta.json) for the regress
task (pipelines/regression.py).

The CSV: a header row `file,target[,target2...]`, then one row per image, `file` relative to the
imagefolder root (`train/a.png` in a pre-split tree). Every decoded image needs a row; a bad row is
a one-line error naming its line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import runtime
from pipelines.datasets import save_array
from pipelines.errors import ConvForgeError


def read_targets_csv(path: Path) -> tuple[list[str], dict[str, list[float]]]:
    """A CSV `file,target[,target2...]` (a header row, then one row per image): the target names and each
    file's values, keyed by its path relative to the data's root."""
    import csv

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConvForgeError(f"data.targets_csv {path}: no such file")
    with open(path, newline="", encoding="utf-8-sig") as handle:  # Excel's "CSV UTF-8" starts with a BOM
        rows = list(csv.reader(handle))
    if not rows or len(rows[0]) < 2 or rows[0][0].strip() != "file":
        raise ConvForgeError(f"{path}: the first row must be the header `file,target[,target2...]`")
    names, values = [name.strip() for name in rows[0][1:]], {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(names) + 1:
            raise ConvForgeError(f"{path}:{line}: {len(row)} columns, expected {len(names) + 1} (file + {names})")
        try:
            numbers = [float(cell) for cell in row[1:]]
        except ValueError:
            raise ConvForgeError(f"{path}:{line}: a target is not a number: {row[1:]}") from None
        if not all(math.isfinite(v) for v in numbers):
            raise ConvForgeError(f"{path}:{line}: targets must be finite, got {row[1:]}")
        key = Path(row[0].strip()).as_posix()
        if key in values:
            raise ConvForgeError(f"{path}:{line}: {key} has a second row")
        values[key] = numbers
    if not values:
        raise ConvForgeError(f"{path}: no rows after the header")
    return names, values


def target_row(table: dict[str, list[float]], image: Path, root: Path, csv_path: Any) -> list[float]:
    """The CSV's values for `image` (a file under `root`), or a user error naming it."""
    key = Path(image).relative_to(root).as_posix()
    if key not in table:
        raise ConvForgeError(f"{csv_path}: no row for {key}")
    return table[key]


def write_targets(raw_root: Path, out: Path, kept: dict[str, np.ndarray], copies: int, names: list[str]) -> None:
    """Own targets beside prepared items: {split}/targets.npy in the items' order (train and val from the
    raw train split's rows `kept`), and their names in meta.json."""
    if copies:
        raise ConvForgeError("augment.copies must be 0 with data.targets_csv: copies are flipped and rotated, "
                             "which would change their targets")
    train = np.load(Path(raw_root) / "train" / "targets.npy")
    save_array(Path(out) / "train" / "targets.npy", train[kept["train"]])
    save_array(Path(out) / "val" / "targets.npy", train[kept["val"]])
    save_array(Path(out) / "test" / "targets.npy", np.load(Path(raw_root) / "test" / "targets.npy"))
    meta = json.loads((Path(out) / "meta.json").read_text())
    runtime.write_json(Path(out) / "meta.json", {**meta, "target_names": names})
