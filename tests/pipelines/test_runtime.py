"""Stage entry error handling and atomic writes."""

from __future__ import annotations

import json
import os

import pytest

from pipelines.errors import ConvForgeError, stage_entry
from pipelines.runtime import TELEMETRY_OFF, atomic_dir, sha256_file, write_json


def test_stage_entry_prints_one_line_and_exits_2(capsys):
    @stage_entry
    def main():
        raise ConvForgeError("data.dataset: no such thing")

    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: data.dataset: no such thing\n"


def test_stage_entry_keeps_programming_errors_as_tracebacks():
    @stage_entry
    def main():
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        main()


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as staging:
        (staging / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        (staging / "a.txt").write_text("half-written")
        raise RuntimeError("crash mid-way")
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def test_write_json_is_sorted_and_complete(tmp_path):
    path = tmp_path / "deep" / "x.json"
    write_json(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert path.read_text().index('"a"') < path.read_text().index('"b"')
    assert len(sha256_file(path)) == 64


def test_telemetry_is_off_in_this_process():
    for key in TELEMETRY_OFF:
        assert key in os.environ
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
