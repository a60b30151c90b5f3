"""Where a run's inputs come from: the DVC hash of its data and the checked-out commit."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml

from pipelines.errors import ConvForgeError
from pipelines.runtime import sha256_file
from pipelines.tracking.store import PROJECT_ROOT


def data_hash(data_dir: Path, root: Path = PROJECT_ROOT) -> str:
    """The DVC md5 of `data_dir` from dvc.lock's augment outs when recorded, else a SHA-256 over its files."""
    data_dir = Path(data_dir)
    lock = root / "dvc.lock"
    if lock.is_file():
        try:
            relative = data_dir.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            relative = None
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for out in stages.get("augment", {}).get("outs", []):
            if relative is not None and out.get("path") == relative and out.get("md5"):
                return str(out["md5"])
    if not data_dir.is_dir():
        raise ConvForgeError(f"{data_dir}: prepared data not found (run `dvc repro augment` first)")
    digest = hashlib.sha256()
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(data_dir).as_posix()}:{sha256_file(path)}\n".encode())
    return "sha256:" + digest.hexdigest()


def git_commit(root: Path = PROJECT_ROOT) -> str | None:
    """The checked-out commit, or None outside git or before the first commit."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
