"""Stage `train@task`: train the search's best config on train, select the epoch on val, log it all to MLflow.

`python -m pipelines.stages.train <task>` reads `artifacts/search/<task>/best.json` and
`data/prepared/<data>`, and writes `artifacts/models/<task>/` (model.safetensors, config.json,
history.json, registration.json); see `pipelines.training.run_training`. An interrupted run resumes
at its last finished epoch when the stage is rerun with the same inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pipelines.runtime as runtime  # first: telemetry off before the stack is imported
from pipelines.errors import stage_entry
from pipelines.params import load_params
from pipelines.stages.task_argument import parse_task
from pipelines.tasks import get_task
from pipelines.training import run_training


@stage_entry
def main() -> None:
    task = parse_task(sys.argv, "train")
    params = load_params()
    runtime.seed_everything(params.seed, params.deterministic)
    runtime.set_threads(params.train.num_threads)
    run_training(params, task, Path("data/prepared") / get_task(task).data,
                 Path("artifacts/search") / task / "best.json", Path("artifacts/models") / task)


if __name__ == "__main__":
    main()
