"""The bench scripts' `--out`: a path the JSON cannot be written to is refused in one line before any measuring,
in every script (each writes its results only at the end)."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from bench.machine import result_file

ROOT = Path(__file__).resolve().parents[1]


def test_a_results_file_is_checked_before_any_work(tmp_path):
    assert result_file(str(tmp_path / "out.json")) == tmp_path / "out.json"
    assert result_file(str(tmp_path / "new" / "deeper" / "out.json")) == tmp_path / "new/deeper/out.json"
    (tmp_path / "earlier.json").write_text("{}")
    assert result_file(str(tmp_path / "earlier.json")) == tmp_path / "earlier.json"  # rewritten
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder; give the JSON file to write"):
        result_file(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match=r"earlier\.json is a file, so .* cannot be written"):
        result_file(str(tmp_path / "earlier.json" / "new" / "out.json"))


def out_flags(path: Path) -> list[ast.Call]:
    """The `add_argument("--out", ...)` calls of a script."""
    return [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
            and getattr(node.func, "attr", "") == "add_argument" and node.args
            and isinstance(node.args[0], ast.Constant) and node.args[0].value == "--out"]


def test_every_bench_script_checks_its_out_flag():
    flags = {path.name: out_flags(path) for path in sorted((ROOT / "bench").glob("*.py"))}
    flags = {name: calls for name, calls in flags.items() if calls}
    assert len(flags) >= 10  # the scripts that write bench/results/*.json
    unchecked = [name for name, calls in flags.items() for call in calls
                 if not any(k.arg == "type" and getattr(k.value, "id", "") == "result_file" for k in call.keywords)]
    assert not unchecked, f"--out without type=result_file: {unchecked}"


@pytest.mark.parametrize(("script", "flags", "says"), [
    ("serve.py", ["--set", "max_batch_size"], "expected KEY=VALUE with KEY one of serve's"),
    ("serve.py", ["--set", "batch=8"], "expected KEY=VALUE with KEY one of serve's"),
    ("serve.py", ["--configs", "bento"], "argument --configs: invalid choice: 'bento'"),
    ("serve.py", ["--tasks", "classification"], "argument --tasks: invalid choice: 'classification'"),
    ("serve.py", ["--levels", "0"], "argument --levels: expected a whole number >= 1"),
    ("serve.py", ["--duration", "0"], "argument --duration: expected seconds above 0"),
    ("upload.py", ["--requests", "0"], "argument --requests: expected a whole number >= 1"),
    ("upload_memory.py", ["--clients", "0"], "argument --clients: expected a whole number >= 1"),
    ("upload_memory.py", ["--side", "5000"], "argument --side: 5000 px is over serve.max_pixels"),
    ("upload_memory.py", ["--route", "explain"], "argument --route: invalid choice: 'explain'"),
    ("owndata.py", ["--sizes", "1000", "0"], "argument --sizes: expected a whole number >= 1"),
    ("gpu_check.py", ["--cpu-dry-run", "--data"], "argument --data: expected one argument"),
    ("pretrain.py", ["--seeds", "0"], "argument --seeds: expected a whole number >= 1"),
    ("pretrain.py", ["--label-fraction", "0"], "argument --label-fraction: expected a fraction above 0 and at most 1"),
    ("pretrain.py", ["--label-fraction", "nan"], "argument --label-fraction: expected a fraction above 0"),
    ("transfer.py", ["--freeze", "-1"], "argument --freeze: expected a whole number >= 0"),
    ("transfer.py", ["--scenes", "0"], "argument --scenes: expected a whole number >= 1"),
    ("train_throughput.py", ["--batch", "0"], "argument --batch: expected a whole number >= 1"),
    ("tune_efficiency.py", ["--samples", "0"], "argument --samples: expected a whole number >= 1"),
    ("tune_efficiency.py", ["--reduction-factor", "1"], "--reduction-factor must be at least 2"),
    ("tune_efficiency.py", ["--precise-bn", "-1"], "argument --precise-bn: expected a whole number >= 0"),
])
def test_a_bad_flag_is_one_line_before_any_work(tmp_path, script, flags, says):
    out = tmp_path / "out.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / script), *flags, "--out", str(out)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2 and says in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not run.stdout and not out.exists()


def test_no_bench_flag_takes_a_bare_number():
    """A count, size or fraction flag has a checking type (bench.machine's positive, whole, fraction, ...): a bare
    int or float took 0, negatives and NaN, which failed deep in the run or measured nothing. Hidden internal flags
    (help=argparse.SUPPRESS, passed by the scripts themselves) are exempt."""
    bare = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for call in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "add_argument"):
                continue
            keywords = {k.arg: k.value for k in call.keywords}
            hidden = getattr(keywords.get("help"), "attr", "") == "SUPPRESS"
            if getattr(keywords.get("type"), "id", "") in ("int", "float") and not hidden:
                bare.append(f"{path.name} {call.args[0].value}")
    assert not bare, f"flags parsed with a bare int/float: {bare}"
