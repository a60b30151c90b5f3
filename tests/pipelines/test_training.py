"""The train stage's input checks: a damaged best.json is one clear line, never a traceback."""

from __future__ import annotations

import json

import pytest

from pipelines.errors import ConvForgeError
from pipelines.training import read_best


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('["resnet"]', "missing key"),
    ('{"family": "resnet"}', "missing key"),
    ('{"family": "resnet", "model": null}', "must be objects"),
    ('{"family": "resnet", "model": {}, "train": [1]}', "must be objects"),
])
def test_a_damaged_best_json_is_one_line(tmp_path, content, message):
    path = tmp_path / "best.json"
    path.write_text(content)
    with pytest.raises(ConvForgeError, match=message) as info:
        read_best(path, "detect")
    assert "\n" not in str(info.value)


def test_a_sound_best_json_reads_back(tmp_path):
    best = {"family": "resnet", "model": {"depth": 10}, "train": {"lr": 0.1}}
    (tmp_path / "best.json").write_text(json.dumps(best))
    assert read_best(tmp_path / "best.json", "detect") == best
