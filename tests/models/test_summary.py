"""models.summary: the profile the search stage calls and the model-card command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models import build
from models.summary import main, profile


def test_profile_counts_params_macs_and_latency() -> None:
    model = build("classify", "lenet5", 10, 1, 28)
    prof = profile(model, "classify", 1, 28, reps=1)
    assert prof["params"] == sum(p.numel() for p in model.parameters())
    # C1 alone: 6 maps x 28x28 x 5x5 MACs
    assert prof["macs"] > 6 * 28 * 28 * 25
    assert prof["latency_ms_1"] > 0 and prof["latency_ms_64"] > prof["latency_ms_1"]


def test_profile_of_a_detector() -> None:
    prof = profile(build("detect", "fcos", 3, 1, 40), "detect", 1, 40, reps=1)
    assert prof["macs"] > 1_000_000 and prof["latency_ms_64"] > 0


def test_model_card_command_writes_json(tmp_path: Path, capsys) -> None:
    main(["--task", "segment", "--family", "fcn", "--json", str(tmp_path / "card.json"), "--threads", "1",
          "--reps", "1"])
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "card.json").read_text())
    assert [row["family"] for row in data["rows"]] == ["fcn"] and data["rows"][0]["macs"] > 0
    assert "fcn" in printed and "segment (input 1x64x64" in printed


def test_model_card_command_rejects_unknown_families(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--task", "classify", "--family", "nosuch"])
    assert exit_info.value.code == 2 and "error: no family" in capsys.readouterr().err
