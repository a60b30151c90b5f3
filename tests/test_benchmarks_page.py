"""BENCHMARKS.md is generated: it must be what bench/report.py makes of the committed bench/results/*.json."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_md_is_what_the_committed_results_give() -> None:
    report = _report()
    expected = report.render(report.load_results())
    assert (ROOT / "BENCHMARKS.md").read_text() == expected, (
        "BENCHMARKS.md differs from bench/results/*.json: run `python bench/report.py` and commit both")


def test_every_plot_the_page_shows_is_committed_next_to_its_results() -> None:
    page = (ROOT / "BENCHMARKS.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)
    assert images, "BENCHMARKS.md shows no plot"
    assert all((ROOT / image).is_file() and image.startswith("bench/results/") for image in images), images
