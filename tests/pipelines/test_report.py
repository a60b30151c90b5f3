"""The end-of-pipeline summary and the README results table."""

from __future__ import annotations

import json

import pytest

from pipelines.errors import ConvForgeError
from pipelines.reporting import collect, replace_readme_table, results_markdown, summary_text


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_summary_and_table_from_pipeline_outputs(tmp_path):
    _write(tmp_path / "artifacts/search/classify/best.json", {
        "family": "resnet", "metric": "val_accuracy", "score": 0.91,
        "families": [{"family": "resnet", "score": 0.91, "params": 78000, "macs": 1.2e7, "latency_ms": 1.5},
                     {"family": "lenet5", "score": 0.88, "params": 61000, "macs": 4.2e5, "latency_ms": 0.3}]})
    _write(tmp_path / "artifacts/models/classify/config.json", {
        "family": "resnet", "registered_model": "convforge-classify", "registered_version": "3",
        "mlflow_run_id": "abc"})
    _write(tmp_path / "reports/metrics/classify.json", {"test_accuracy": 0.925, "test_top5": 0.998, "other": 1})
    results = collect(tmp_path)
    assert results["detect"]["best"] is None
    text = summary_text(results, "sqlite:///mlflow.db", "127.0.0.1", 3000)
    assert "resnet" in text and "accuracy=0.9250" in text and "convforge-classify v3" in text
    assert "(not trained)" in text  # detect and segment have no outputs yet
    table = results_markdown(results)
    assert "| classify | resnet | accuracy 0.9250, top5 0.9980 | val_accuracy | 0.9100 |" in table
    assert "| classify | lenet5 | 0.8800 | 61,000 |" in table


def test_readme_table_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- RESULTS:START -->\nold\n<!-- RESULTS:END -->\nrest\n")
    replace_readme_table(readme, "| new |\n")
    assert readme.read_text() == "intro\n<!-- RESULTS:START -->\n| new |\n<!-- RESULTS:END -->\nrest\n"
    readme.write_text("no markers")
    with pytest.raises(ConvForgeError, match="markers"):
        replace_readme_table(readme, "x")


def test_corrupt_output_is_a_user_error(tmp_path):
    (tmp_path / "reports/metrics").mkdir(parents=True)
    (tmp_path / "reports/metrics/classify.json").write_text("{not json")
    with pytest.raises(ConvForgeError, match="not valid JSON"):
        collect(tmp_path)
