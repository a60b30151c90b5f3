"""bench/families.py on the digits fixture: two tiny families for one epoch into a temporary MLflow store give
one table row and one MLflow run per family, named after it, that the benchmark page renders beside the
published rows; bad input is one line on stderr."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from bench import families as bench
from pipelines.tracking.store import client

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["lenet5", "resnet"]
MEASURED = ("best_val_accuracy", "test_accuracy", "params", "macs", "latency_ms", "train_s")


@pytest.fixture(scope="module")
def run(prepared_classify, tmp_path_factory) -> tuple[dict, str]:
    """The script's result on the digits fixture, and the store it tracked into."""
    folder = tmp_path_factory.mktemp("families")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    bench.main(["--families", *FAMILIES, "--train-items", "128", "--val-items", "32", "--test-items", "64",
                "--epochs", "1", "--threads", "1", "--data", str(prepared_classify),
                "--tracking-uri", uri, "--out", str(folder / "families.json")])
    return json.loads((folder / "families.json").read_text()), uri


def test_one_row_per_family_at_the_shared_budget(run) -> None:
    result, _ = run
    assert [row["family"] for row in result["rows"]] == FAMILIES
    assert result["budget"] == {"train_items": 128, "val_items": 32, "test_items": 64, "epochs": 1, "threads": 1}
    for row in result["rows"]:
        assert 0 <= row["test_accuracy"] <= 1 and row["params"] > 0 and row["macs"] > 0 and row["latency_ms"] > 0
    assert {"model": "WRN-40-4", "test_accuracy": 0.967} in result["published"]


def test_one_mlflow_run_per_family_with_params_and_metrics(run) -> None:
    result, uri = run
    store = client(uri)
    experiment = store.get_experiment_by_name(bench.EXPERIMENT)
    runs = {r.info.run_name: r for r in store.search_runs([experiment.experiment_id])}
    assert sorted(runs) == FAMILIES
    for row in result["rows"]:
        data = runs[row["family"]].data
        assert {key: data.metrics[key] for key in MEASURED} == pytest.approx({key: row[key] for key in MEASURED})
        assert data.params["budget.epochs"] == "1" and data.params["family"] == row["family"]
    assert runs["resnet"].data.params["hparams.depth"] == "10"


def test_the_benchmark_page_shows_measured_and_published_rows(run) -> None:
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    page = report.render({"families": run[0]})
    assert "| lenet5 | measured here |" in page and "| *WRN-40-4* | *published* | *0.967* |" in page


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs"),
    (["--threads", "-1"], "--threads"),
    (["--families", "nosuchnet"], "nosuchnet"),
    (["--data", "/nonexistent/classify", "--threads", "1"], "dvc repro augment"),
])
def test_bad_input_is_one_line_on_stderr(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
