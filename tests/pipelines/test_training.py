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


def test_an_interrupted_training_resumes_only_under_the_same_engine(project_params, tmp_path):
    """The resume key left the engine out: a float32 run interrupted and rerun with `-S train.amp=bf16` went on from
    its float32 checkpoint under bf16. The resolved device, AMP, memory format and compilation are in it."""
    from dataclasses import replace

    from pipelines.engine import EngineSettings
    from pipelines.training import TrainingJob, resume_key

    settings = EngineSettings.from_params(project_params)
    job = TrainingJob("classify", "lenet5", {}, project_params.train.classify, None, None, None, settings,
                      project_params.augment.policy, tmp_path, "data", {})
    key = resume_key(job, project_params)
    assert resume_key(replace(job, settings=replace(settings, amp="off")), project_params) == key  # auto, here
    assert resume_key(replace(job, settings=replace(settings, amp="bf16")), project_params) != key
    assert resume_key(replace(job, settings=replace(settings, compile=True)), project_params) != key
