"""Stage `search@task`: a Ray Tune search over the task's families, tracked in MLflow.

`python -m pipelines.stages.search <task>` reads `data/prepared/<data>` and writes
`artifacts/search/<task>/` (best.json, families.json/.csv, score_vs_latency.png); see
`pipelines.search.run_search`. An interrupted search resumes when the stage is rerun with the same inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pipelines.runtime as runtime  # first: telemetry off before the stack is imported
from pipelines.errors import stage_entry
from pipelines.params import load_params
from pipelines.search import run_search
from pipelines.stages.task_argument import parse_task
from pipelines.tasks import get_task


@stage_entry
def main() -> None:
    task = parse_task(sys.argv, "search")
    params = load_params()
    runtime.seed_everything(params.seed, params.deterministic)
    run_search(params, task, Path("data/prepared") / get_task(task).data, Path("artifacts/search") / task)


if __name__ == "__main__":
    main()
