"""What a finished `dvc repro` produced: per task the winner, its test metrics, where to look next.

The summary printed at the end of `make repro` (with the promote stage's verdict: when the newest
model was not promoted, the champion it keeps serving), and the results table (per task and family,
from the pipeline's own outputs) as Markdown for README.md. The headline metrics of a task are
its adapter's `headline` (pipelines/tasks.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pipelines.errors import ConvForgeError
from pipelines.tasks import TASKS, get_task
from models._checkpoint import read_registration


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ConvForgeError(f"{path}: not valid JSON ({exc})") from None


def collect(root: Path) -> dict[str, dict[str, Any]]:
    """Per task: the search's best.json, its families table, the trained config, the test metrics and the
    promote stage's report."""
    results = {}
    for task in TASKS:
        results[task] = {
            "best": _read_json(root / "artifacts/search" / task / "best.json"),
            "model": {**(_read_json(root / "artifacts/models" / task / "config.json") or {}),
                      **read_registration(root / "artifacts/models" / task)},
            "metrics": _read_json(root / "reports/metrics" / f"{task}.json") or {},
            "promotion": _read_json(root / "reports/promotion" / f"{task}.json"),
        }
    return results


def headline(task: str, metrics: dict[str, Any]) -> dict[str, float]:
    """The headline metrics of a task that are present, else every scalar metric."""
    chosen = {k: metrics[k] for k in get_task(task).headline if isinstance(metrics.get(k), (int, float))}
    return chosen or {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def results_markdown(results: dict[str, dict[str, Any]]) -> str:
    """Two Markdown tables: the winners' test metrics, and every family the search tried."""
    lines = ["| task | winner | test metrics | search metric | search score |", "| --- | --- | --- | --- | --- |"]
    for task, r in results.items():
        best = r["best"] or {}
        metrics = ", ".join(f"{k.removeprefix('test_')} {_fmt(v)}" for k, v in headline(task, r["metrics"]).items())
        lines.append(f"| {task} | {best.get('family', '—')} | {metrics or '—'} | {best.get('metric', '—')} "
                     f"| {_fmt(best.get('score'))} |")
    lines += ["", "| task | family | best val score | params | MACs | CPU latency 1 img (ms) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for task, r in results.items():
        for row in (r["best"] or {}).get("families", []):
            lines.append(f"| {task} | {row.get('family')} | {_fmt(row.get('score'))} | {_fmt(row.get('params'))} "
                         f"| {_fmt(row.get('macs'))} | {_fmt(row.get('latency_ms'))} |")
    return "\n".join(lines) + "\n"


def promotion_lines(promotion: dict[str, Any] | None) -> list[str]:
    """The promote stage's verdict, and what the service serves when the newest model was not promoted."""
    if not promotion:
        return []
    lines = [f"  {'':<9} promotion: {promotion.get('verdict', '?')}"]
    champion, candidate = promotion.get("champion") or {}, promotion.get("candidate") or {}
    if promotion.get("promoted") or champion.get("version") == candidate.get("version"):
        return lines
    if champion.get("version") is not None:
        return lines + [f"  {'':<9} the newest run was not promoted: the service keeps serving "
                        f"v{champion['version']}"]
    return lines + [f"  {'':<9} the newest run was not promoted and there is no champion: "
                    "the package stage stops until a model passes the gate"]


def summary_text(results: dict[str, dict[str, Any]], tracking_uri: str, host: str, port: int) -> str:
    """The lines printed at the end of `make repro`."""
    routes = " ".join(f"/{task}" for task in TASKS)
    out = ["", "ConvForge: pipeline finished", ""]
    for task, r in results.items():
        best, model = r["best"] or {}, r["model"] or {}
        family = model.get("family") or best.get("family") or "(not trained)"
        metrics = "  ".join(f"{k.removeprefix('test_')}={_fmt(v)}" for k, v in headline(task, r["metrics"]).items())
        out.append(f"  {task:<9} {family:<14} {metrics or '(no test metrics yet)'}")
        if model.get("registered_model"):
            out.append(f"  {'':<9} MLflow model {model['registered_model']} v{model.get('registered_version')}"
                       f" (run {model.get('mlflow_run_id', '?')})")
        out += promotion_lines(r.get("promotion"))
    out += ["", f"  MLflow runs: {tracking_uri}  ->  make ui  (http://127.0.0.1:5000)",
            "  Metrics:     dvc metrics show   Plots: dvc plots show",
            f"  Serve:       make serve  (http://{host}:{port}, POST {routes})", ""]
    return "\n".join(out)


def replace_readme_table(readme: Path, table: str, marker: str = "RESULTS") -> None:
    """Swap the text between `<!-- {marker}:START -->` and `<!-- {marker}:END -->` for `table`."""
    text = readme.read_text()
    pattern = re.compile(rf"(<!-- {marker}:START -->\n).*?(<!-- {marker}:END -->)", re.S)
    if not pattern.search(text):
        raise ConvForgeError(f"{readme}: no {marker}:START/END markers to replace")
    readme.write_text(pattern.sub(lambda m: m.group(1) + table + m.group(2), text))
