"""What the fetch stage reads from outside the repository, as a small JSON DVC can compare.

A user's folder (`data.dataset: imagefolder:PATH`, `coco:PATH`, `masks:PATH`) and `data.targets_csv` live
outside DVC's view: the params name them, but adding a photo changes no param. The `source` stage
(dvc.yaml, `always_changed`) writes this fingerprint to data/source.json on every `dvc repro`, and
fetch depends on that file, so fetch runs again exactly when the files behind the params changed.

A folder counts by each file's relative path, size and modification time (as make and rsync's quick
check do: no file is read, so a tree of 100,000 photos is listed in about a second); a targets CSV by
its contents. Built-in datasets are fixed releases: their name alone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from pipelines import runtime
from pipelines.params import DataParams


def tree_fingerprint(root: Path) -> dict[str, Any]:
    """The files below `root` (links followed, in path order): their count, total bytes and a SHA-256 over
    each one's relative path, size and modification time in nanoseconds."""
    if not root.is_dir():  # fetch, which runs next, says so in its own line
        return {"missing": True}
    listing, files, size = hashlib.sha256(), 0, 0
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            try:
                stat = path.stat()
            except OSError:  # a dangling link: fetch reports what it cannot read
                continue
            relative = path.relative_to(root).as_posix()
            listing.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            files, size = files + 1, size + stat.st_size
    return {"files": files, "bytes": size, "listing_sha256": listing.hexdigest()}


def source_fingerprint(data: DataParams) -> dict[str, Any]:
    """The dataset's fingerprint: its name, and for own data its folder's and targets CSV's state."""
    fingerprint: dict[str, Any] = {"dataset": data.dataset}
    if data.path is not None:
        fingerprint["tree"] = tree_fingerprint(data.path)
    if data.targets_csv is not None:
        csv = Path(data.targets_csv).expanduser()
        fingerprint["targets_csv_sha256"] = runtime.sha256_file(csv) if csv.is_file() else None
    return fingerprint


def write_fingerprint(data: DataParams, out: Path) -> dict[str, Any]:
    """Write the fingerprint to `out` (atomically; the same bytes for the same source); returns it."""
    fingerprint = source_fingerprint(data)
    runtime.write_json(out, fingerprint)
    return fingerprint
