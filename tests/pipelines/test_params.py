"""params.yaml validation: the repo's file loads, and each kind of mistake gives its one-line message;
the reads tracer behind `CONVFORGE_PARAMS_TRACE`."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import yaml

from pipelines import params as params_module
from pipelines.errors import ConvForgeError
from pipelines.params import (TRACE_ENV, Params, TaskSearchParams, TrainConfig, TrainSpaceParams, load_params,
                              params_reads, plain, stage_name, traced)

ROOT = Path(__file__).resolve().parents[2]


def write_params(tmp_path: Path, section: str, key: str, value) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConvForgeError) as exc:
        load_params(path)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_repo_params_load():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.kind in ("fashion-mnist", "mnist", "cifar10", "cifar100", "digits", "imagefolder", "coco",
                                "masks")
    assert 0 < params.augment.val_fraction < 0.5
    assert params.scenes.min_items <= params.scenes.max_items


def test_exponent_floats_as_dvc_writes_them(tmp_path):
    """`dvc exp run -S train.classify.grad_clip=0.000001` writes `1e-06`: a float, as YAML 1.2 (and DVC) read it."""
    text = (ROOT / "params.yaml").read_text()
    assert "  grad_clip: " in text
    lines = [line if not line.startswith("    grad_clip: ") else "    grad_clip: 1e-06" for line in text.splitlines()]
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\n")
    params = load_params(path)
    assert params.train.classify.grad_clip == 1e-06


def test_unknown_key(tmp_path):
    assert error_of(write_params(tmp_path, "augment", "copys", 2)) == "augment.copys: unknown key"


def test_wrong_type(tmp_path):
    assert error_of(write_params(tmp_path, "augment", "copies", "two")) == \
        "augment.copies: expected int >= 0, got 'two'"


def test_out_of_range(tmp_path):
    message = error_of(write_params(tmp_path, "augment", "val_fraction", 0.7))
    assert message.startswith("augment.val_fraction: expected number > 0") and "< 0.5" in message
    assert message.endswith("got 0.7")


def test_bad_dataset_name_lists_the_valid_ones(tmp_path):
    message = error_of(write_params(tmp_path, "data", "dataset", "imagenet"))
    assert message.startswith("data.dataset: expected one of fashion-mnist, mnist, cifar10, cifar100, digits")
    assert "imagefolder:PATH" in message and "coco:PATH" in message and "masks:PATH" in message
    assert message.endswith("got 'imagenet'")


def test_bad_choice(tmp_path):
    message = error_of(write_params(tmp_path, "data", "on_corrupt", "ignore"))
    assert message.startswith("data.on_corrupt: expected one of") and "'skip'" in message and "'fail'" in message


def test_max_pixels_reads_200_mp_phone_photos_and_must_be_a_positive_int(tmp_path):
    assert load_params(ROOT / "params.yaml").data.max_pixels >= 16320 * 12240  # a phone's 200 MP mode
    assert error_of(write_params(tmp_path, "data", "max_pixels", 0)) == "data.max_pixels: expected int >= 1, got 0"
    assert error_of(write_params(tmp_path, "data", "max_pixels", 2.5e8)).startswith("data.max_pixels: expected int")


def test_amp_off_written_bare_is_off(tmp_path):
    """YAML reads `amp: off` (and `dvc exp run -S train.amp=off`) as false: it means "off", not a type error."""
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text().replace("  amp: auto ", "  amp: off  ", 1))
    assert "  amp: off  " in path.read_text() and load_params(path).train.amp == "off"
    assert error_of(write_params(tmp_path, "train", "amp", True)).startswith("train.amp: expected one of")


def test_scene_ranges_must_be_ordered(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["scenes"]["min_items"], raw["scenes"]["max_items"] = 4, 2
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert error_of(path) == "scenes: min_items (4) must be <= max_items (2)"


def test_missing_file_and_bad_yaml(tmp_path):
    assert "no such params file" in error_of(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    assert "not valid YAML" in error_of(bad)


# The reads tracer (CONVFORGE_PARAMS_TRACE) that pipelines.depcheck compares with dvc.yaml's params.

@pytest.fixture
def reads(monkeypatch):
    """A clean set of recorded reads for one test; returns a function that reads it."""
    monkeypatch.setattr(params_module, "_reads", set())
    return lambda: params_reads()


@pytest.fixture
def params():
    return traced(load_params(ROOT / "params.yaml"))


def test_tracing_is_off_without_the_environment_variable(monkeypatch):
    monkeypatch.delenv(TRACE_ENV, raising=False)
    loaded = load_params(ROOT / "params.yaml")
    assert type(loaded) is Params and type(loaded.train.classify) is TrainConfig


def test_traced_sections_are_the_same_typed_sections(params):
    assert isinstance(params, Params) and isinstance(params.train.classify, TrainConfig)
    assert params.train.classify.model_dump() == load_params(ROOT / "params.yaml").train.classify.model_dump()
    assert repr(params.mlflow).startswith("MlflowParams(")


def test_a_leaf_read_records_its_path_and_a_section_read_nothing(params, reads):
    params.train.task("classify")
    params.search.classify.space
    assert reads() == set()
    assert params.train.classify.lr == 0.05 and params.seed == 42
    params.search.classify.model_space["resnet"]  # a dict value is one leaf
    params.data.kind  # a property reads its field
    assert reads() == {"train.classify.lr", "seed", "search.classify.model_space", "data.dataset"}


def test_model_dump_reads_every_leaf_it_carries(params, reads):
    params.augment.model_dump(exclude={"preview_count": True, "policy": {"erasing"}})
    assert reads() == {"augment.val_fraction", "augment.copies", "augment.crop_size",
                       *(f"augment.policy.{k}" for k in ("crop_padding", "hflip", "rotation_deg", "translate",
                                                          "color_jitter", "scale_jitter"))}


def test_updated_replaced_keys_are_not_reads(params, reads):
    cfg = params.train.classify.updated(epochs=2, lr=0.1)
    assert reads() == set() and (cfg.epochs, cfg.lr) == (2, 0.1)
    cfg.momentum
    assert reads() == {"train.classify.momentum"}
    dumped = cfg.model_dump()
    assert dumped["epochs"] == 2
    assert reads() == {f"train.classify.{k}" for k in TrainConfig.model_fields} - {"train.classify.epochs",
                                                                                  "train.classify.lr"}


def test_model_copy_stays_traced_and_its_update_is_not_a_read(params, reads):
    copy = params.model_copy(update={"train": params.train.model_copy(update={"num_threads": 3})})
    assert reads() == set()
    assert copy.train.num_threads == 3 and copy.train.device == "auto"
    assert reads() == {"train.device"}


def test_pickling_reads_every_leaf_and_unpickles_plain(params, reads):
    section = pickle.loads(pickle.dumps(params.search.classify))
    assert type(section) is TaskSearchParams
    assert reads() == {f"search.classify.{k}" for k in TaskSearchParams.model_fields
                       if k != "space"} | {f"search.classify.space.{k}" for k in TrainSpaceParams.model_fields}
    assert type(plain(params)) is Params


def test_validation_errors_are_unchanged_when_tracing(tmp_path, monkeypatch):
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "traces"))
    monkeypatch.setattr(params_module, "_trace_owner", [os.getpid()])  # no atexit writer from this test
    assert error_of(write_params(tmp_path, "augment", "copies", "two")) == \
        "augment.copies: expected int >= 0, got 'two'"
    loaded = load_params(ROOT / "params.yaml")
    assert type(loaded) is not Params and isinstance(loaded, Params)
    with pytest.raises(ConvForgeError, match="train.epochs: expected int >= 1, got 0"):
        loaded.train.classify.updated(epochs=0)


def test_stage_names_come_from_the_entry_module_and_its_task():
    assert stage_name("pipelines.stages.search", ["search.py", "classify"]) == "search@classify"
    assert stage_name("pipelines.stages.fetch", ["fetch.py"]) == "fetch"
    assert stage_name("pytest", ["pytest", "-q"]) is None and stage_name(None, []) is None


def test_only_the_stage_process_that_loaded_params_writes_its_reads(tmp_path, monkeypatch, reads):
    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="pipelines.stages.train")
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", ["train.py", "detect"])
    params_module._reads.update({"seed", "train.detect.lr"})
    monkeypatch.setattr(params_module, "_trace_owner", [os.getpid() + 1])  # e.g. a forked DataLoader worker
    params_module._write_trace(tmp_path)
    assert not (tmp_path / "train@detect.json").exists()
    monkeypatch.setattr(params_module, "_trace_owner", [os.getpid()])
    params_module._write_trace(tmp_path)
    assert json.loads((tmp_path / "train@detect.json").read_text()) == ["seed", "train.detect.lr"]


def test_a_run_recorded_before_a_train_key_existed_replays_at_that_keys_old_behaviour(project_params):
    from pipelines.replay import ADDED_KEYS, recorded_config

    recorded = project_params.train.classify.model_dump()
    for key in ADDED_KEYS:
        del recorded[key]
    assert recorded_config(recorded, "train").precise_bn == 0  # validated with the running averages, as it trained
    with pytest.raises(ConvForgeError, match="precise_bn"):
        recorded_config({**recorded, "precise_bn": -1}, "train")


def test_a_cuda_run_is_never_replayed_as_a_cpu_one():
    """A run recorded with engine.device cuda but without MLflow's GPU system metrics (shorter than their sampling
    interval, NVML out of the container's reach, system metrics off) was taken for a CPU run: replayed on the CPU
    and compared for exact equality, it always reported a mismatch. The recorded device decides; the metrics only
    for runs that predate it."""
    from pipelines.replay import recorded_on_cpu
    from pipelines.tracking.lineage import RecordedRun

    def run(params, metrics):
        return RecordedRun("r", "0", {}, params, metrics)

    assert not recorded_on_cpu(run({"engine.device": "cuda"}, {}))
    assert recorded_on_cpu(run({"engine.device": "cpu"}, {"system/gpu_0_utilization_percentage": 3.0}))
    assert recorded_on_cpu(run({}, {"system/cpu_utilization_percentage": 50.0}))
    assert not recorded_on_cpu(run({}, {"system/gpu_0_utilization_percentage": 80.0}))
