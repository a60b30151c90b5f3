"""Stage `promote@task`: the gate of `promote.<task>` on the new model's test metrics, and the champion.

`python -m pipelines.stages.promote <task>` reads `artifacts/models/<task>/` (its registered version),
`reports/metrics/<task>.json` and the test split of `data/prepared/<data>`; moves the registry's
`champion` alias when the gate passes; and writes `reports/promotion/<task>.json` and
`artifacts/champion/<task>/`, the folder the package stage serves; see `pipelines.promotion.run_promotion`.
A failed gate keeps the champion and exits 0: the report and the summary say why.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pipelines.runtime  # noqa: F401  (first: telemetry off before the stack is imported)
from pipelines.errors import stage_entry
from pipelines.params import load_params
from pipelines.promotion import run_promotion
from pipelines.stages.task_argument import parse_task
from pipelines.tasks import get_task


@stage_entry
def main() -> None:
    task = parse_task(sys.argv, "promote")
    params = load_params()
    run_promotion(params, task, Path("artifacts/models") / task, Path("reports/metrics") / f"{task}.json",
                  Path("data/prepared") / get_task(task).data / "test", Path("artifacts/champion") / task,
                  Path("reports/promotion") / f"{task}.json")


if __name__ == "__main__":
    main()
