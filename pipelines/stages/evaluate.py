"""Stage `evaluate@task`: the trained model's metrics and plots on the test split.

`python -m pipelines.stages.evaluate <task>` reads `artifacts/models/<task>/` and `data/prepared/<data>`,
and writes `reports/metrics/<task>.json`, `reports/plots/<task>/` (JSON for DVC's plots) and
`reports/images/<task>/` (PNGs), also added to the training run in MLflow; see
`pipelines.evaluation.run_evaluation`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pipelines.runtime as runtime  # first: telemetry off before the stack is imported
from pipelines.errors import stage_entry
from pipelines.evaluation import run_evaluation
from pipelines.params import load_params
from pipelines.stages.task_argument import parse_task
from pipelines.tasks import get_task


@stage_entry
def main() -> None:
    task = parse_task(sys.argv, "evaluate")
    params = load_params()
    runtime.seed_everything(params.seed, params.deterministic)
    runtime.set_threads(params.train.num_threads)
    reports = Path("reports")
    run_evaluation(params, task, Path("data/prepared") / get_task(task).data, Path("artifacts/models") / task,
                   reports / "metrics" / f"{task}.json", reports / "plots" / task, reports / "images" / task)


if __name__ == "__main__":
    main()
