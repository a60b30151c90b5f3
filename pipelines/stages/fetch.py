"""Stage `fetch`: the dataset named by `data.dataset` -> data/raw/ with meta.json (pipelines/raw.py)."""

from __future__ import annotations

import time
from pathlib import Path

from pipelines.errors import stage_entry
from pipelines.params import load_params
from pipelines.raw import fetch


@stage_entry
def main() -> None:
    params = load_params()
    started = time.perf_counter()
    meta = fetch(params.data, Path("data/raw"))
    skipped = f", skipped {len(meta['skipped'])} image(s)" if meta["skipped"] else ""
    print(f"fetch: {meta['name']} from {meta['source']}: {meta['splits']} items, {len(meta['classes'])} classes, "
          f"{meta['in_channels']} channel(s), {meta['image_size']} px{skipped} "
          f"-> data/raw in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
