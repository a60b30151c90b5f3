"""Stage `source`: the state of the files `data.dataset` and `data.targets_csv` name -> data/source.json.

It runs on every `dvc repro` (`always_changed`) and takes about a second; fetch depends on its output,
so new, changed or removed images in your own data's folder run fetch and what follows it again, and
an unchanged folder runs nothing more (pipelines/fingerprint.py).
"""

from __future__ import annotations

from pathlib import Path

from pipelines.errors import stage_entry
from pipelines.fingerprint import write_fingerprint
from pipelines.params import load_params

OUT = Path("data/source.json")


@stage_entry
def main() -> None:
    fingerprint = write_fingerprint(load_params().data, OUT)
    tree = fingerprint.get("tree", {})
    files = f": {tree['files']:,} files, {tree['bytes'] / 2**20:,.1f} MiB" if "files" in tree else \
        (": no such folder" if tree else "")
    print(f"source: {fingerprint['dataset']}{files} -> {OUT}")


if __name__ == "__main__":
    main()
