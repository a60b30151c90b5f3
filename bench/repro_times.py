"""Time the default run stage by stage: `dvc repro` with a clock on each stage.

Runs `dvc repro` (extra arguments are passed on, e.g. `--force` for a whole run on data and
models already there), passes its output through unchanged, notes when each stage starts and
when the run ends, and writes bench/results/repro_times.json. `--readme` also writes the
per-stage time table into README.md (between the TIMES markers), next to the 25-minute budget
of the default run on 2 CPU cores.

    .venv/bin/python bench/repro_times.py --force --readme

A search stage that finds its finished search in ray_results (same inputs and code) restores it instead of
training its trials again, so `--force` alone does not time a whole run: when a search resumed, nothing is
written and the run says which; move `ray_results/search-*` aside first.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)
from bench.machine import Parser, describe  # noqa: E402
from pipelines.reporting import replace_readme_table  # noqa: E402
from pipelines.tuner import RESUMING  # noqa: E402

RESULT = ROOT / "bench" / "results" / "repro_times.json"
BUDGET_MIN = 25.0  # the default run on 2 CPU cores, set-up excluded
STARTED = re.compile(r"^Running stage '([^']+)'")


def resumed_stages(lines: list[str]) -> list[str]:
    """The stages of a `dvc repro` output that restored a stored search rather than running its trials."""
    stage, resumed = None, []
    for line in lines:
        found = STARTED.match(line)
        if found:
            stage = found.group(1)
        elif RESUMING in line and stage is not None and stage not in resumed:
            resumed.append(stage)
    return resumed


def always_run(dvc_yaml: Path = ROOT / "dvc.yaml") -> set[str]:
    """dvc.yaml's `always_changed` stages: every repro runs them, so they alone are no run to time."""
    return {name for name, stage in yaml.safe_load(dvc_yaml.read_text())["stages"].items()
            if stage.get("always_changed")}


def timed_repro(args: list[str]) -> tuple[list[dict], float, int, list[str]]:
    """Run `dvc repro args`, echoing its output; the seconds of each stage that ran, the total, the exit code
    and the stages that resumed a stored search."""
    # The stages' `python` must be the virtualenv's, as under `make repro`
    path = str(ROOT / ".venv" / "bin") + os.pathsep + os.environ.get("PATH", "")
    dvc = shutil.which("dvc", path=path)
    if dvc is None:
        sys.exit("repro_times: no `dvc` in .venv/bin or on PATH: run `make setup` first")
    start = time.perf_counter()
    marks: list[tuple[str, float]] = []
    lines: list[str] = []
    with subprocess.Popen([dvc, "repro", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1, env={**os.environ, "PATH": path}) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            lines.append(line)
            found = STARTED.match(line)
            if found:
                marks.append((found.group(1), time.perf_counter()))
        code = process.wait()
    end = time.perf_counter()
    stages = [{"stage": name, "seconds": round((marks[i + 1][1] if i + 1 < len(marks) else end) - at, 1)}
              for i, (name, at) in enumerate(marks)]
    return stages, round(end - start, 1), code, resumed_stages(lines)


def table(result: dict) -> str:
    """The per-stage time table in Markdown, with the total against the budget."""
    lines = ["| stage | minutes | share |", "| --- | ---: | ---: |"]
    total = result["total_seconds"]
    for row in result["stages"]:
        lines.append(f"| `{row['stage']}` | {row['seconds'] / 60:.2f} | {row['seconds'] / total:.0%} |")
    verdict = "within" if total / 60 <= result["budget_minutes"] else "over"
    lines.append(f"| **total** | **{total / 60:.1f}** | {verdict} the {result['budget_minutes']:.0f}-minute budget |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true", help="write the time table into README.md")
    known, rest = parser.parse_known_args()
    machine = describe()
    stages, total, code, resumed = timed_repro(rest)
    if code != 0:
        sys.exit(code)  # dvc said why; a failed run's times are not a time table
    if not {row["stage"] for row in stages} - always_run():
        sys.exit("repro_times: no stage ran (all up to date): add --force to time the whole run")
    if resumed:
        sys.exit(f"repro_times: {', '.join(resumed)} restored a finished search from ray_results (its trials did "
                 "not run again), so these are not a whole run's times and nothing was written: move "
                 "ray_results/search-* aside and rerun")
    result = {"machine": machine, "python": platform.python_version(), "command": "dvc repro " + " ".join(rest),
              "budget_minutes": BUDGET_MIN, "total_seconds": total, "stages": stages}
    runtime.write_json(RESULT, result)
    print(table(result), end="")
    if known.readme:
        replace_readme_table(ROOT / "README.md", table(result), marker="TIMES")


if __name__ == "__main__":
    main()
