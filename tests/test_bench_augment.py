"""bench/augment.py on the digits fixture: both arms give the same items and the same trained weights, and the
benchmark page renders its tables; bad input is one line on stderr."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from bench import augment as bench

ROOT = Path(__file__).resolve().parents[1]


def test_both_arms_agree_and_the_page_renders_them(prepared_classify, tmp_path) -> None:
    out = tmp_path / "augment.json"
    bench.main(["--items", "256", "--epoch-items", "96", "--repeats", "1", "--threads", "1",
                "--data", str(prepared_classify), "--out", str(out)])
    result = json.loads(out.read_text())
    assert [row["strength"] for row in result["rows"]] == list(bench.STRENGTHS)
    assert all(row["identical"] and row["batched_items_per_s"] > 0 for row in result["rows"])
    assert result["epoch"]["same_weights"] and result["epoch"]["items"] == 96 and result["epoch_threads"] == 1
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    page = report.render({"augment": result})
    assert "| 0.63 |" in page and "| CropFlip batches (the default) |" in page


@pytest.mark.parametrize("argv,message", [(["--threads", "-1"], "--threads: expected a whole number >= 0"),
                                          (["--repeats", "0"], "--repeats: expected a whole number >= 1")])
def test_bad_flags_are_one_line(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_data_says_what_to_run(tmp_path) -> None:
    with pytest.raises(SystemExit, match="run `dvc repro augment` first"):
        bench.main(["--data", str(tmp_path)])


def test_a_policy_that_does_not_batch_is_one_line(prepared_classify, tmp_path) -> None:
    params = (ROOT / "params.yaml").read_text().replace("    erasing: 0.0 ", "    erasing: 0.5 ", 1)
    assert "    erasing: 0.5 " in params
    (tmp_path / "params.yaml").write_text(params)
    with pytest.raises(SystemExit, match="has steps besides crop and flip"):
        bench.main(["--params", str(tmp_path / "params.yaml"), "--data", str(prepared_classify)])
