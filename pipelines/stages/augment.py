"""Stage `augment`: data/raw -> data/prepared/{classify,scenes} + reports/augment previews
(pipelines/preparation.py)."""

from __future__ import annotations

import time
from pathlib import Path

from pipelines import runtime
from pipelines.errors import stage_entry
from pipelines.params import load_params
from pipelines.preparation import prepare_from_classify, prepare_from_scenes
from pipelines.raw import load_raw


@stage_entry
def main() -> None:
    params = load_params()
    runtime.seed_everything(params.seed, params.deterministic)
    started = time.perf_counter()
    raw = load_raw(Path("data/raw"))
    if raw.is_items:
        prepare_from_classify(raw, Path("data/prepared"), Path("reports/augment"), params.augment, params.scenes,
                              params.seed)
    else:
        prepare_from_scenes(raw, Path("data/prepared"), Path("reports/augment"), params.augment, params.seed)
    print(f"augment: done in {time.perf_counter() - started:.1f} s -> data/prepared, reports/augment")


if __name__ == "__main__":
    main()
