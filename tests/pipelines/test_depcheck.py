"""pipelines/depcheck.py: dvc.yaml's deps against the import graph, its params against read traces."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import yaml

from pipelines import depcheck
from pipelines.depcheck import Stage, check, import_closure, leaf_keys, param_problems, stages
from pipelines.params import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def test_the_real_dvc_yaml_covers_every_file_its_stages_import() -> None:
    assert check(ROOT / "dvc.yaml") == []


def test_foreach_stages_are_expanded_with_their_key_and_item() -> None:
    expanded = {s.name: s for s in stages(yaml.safe_load((ROOT / "dvc.yaml").read_text()))}
    assert {"fetch", "search@classify", "train@detect", "evaluate@segment", "package"} <= set(expanded)
    train = expanded["train@detect"]
    assert train.cmd == "python -m pipelines.stages.train detect"
    assert "data/prepared/scenes" in train.deps and "artifacts/search/detect/best.json" in train.deps


def write_project(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))


def test_the_import_walk_follows_every_kind_of_project_import(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(depcheck, "PACKAGES", ("app", "lib"))  # a made-up project of two packages
    write_project(tmp_path, {
        "app/__init__.py": '"""Only a docstring: not a dep."""\n',
        "app/stages/__init__.py": "",
        "app/stages/run.py": """
            from typing import TYPE_CHECKING
            from app import lazy_user
            from app.pkg import sub
            if TYPE_CHECKING:
                from app import typing_only
            """,
        "app/lazy_user.py": "def f():\n    import app.in_function\n",
        "app/in_function.py": "import numpy\nfrom . import relative\n",
        "app/relative.py": "import lib\n",
        "app/typing_only.py": "",
        "app/pkg/__init__.py": "X = 1\n",
        "app/pkg/sub.py": "",
        "lib/__init__.py": "import pkgutil\nfor m in pkgutil.iter_modules(lib.__path__):\n    pass\n",
        "lib/family.py": "",
    })
    files = {p.relative_to(tmp_path).as_posix() for p in import_closure(tmp_path, "app.stages.run")}
    assert files == {f"app/{name}.py" for name in ("stages/run", "lazy_user", "in_function", "relative", "pkg/__init__",
                                                   "pkg/sub")} | {"lib/__init__.py", "lib/family.py"}


def traces_reading_everything_declared(traces: Path, dvc_yaml: Path) -> None:
    """A trace per stage that reads every leaf it declares: the params check then passes."""
    leaves = leaf_keys()
    traces.mkdir()
    for stage in stages(yaml.safe_load(dvc_yaml.read_text())):
        reads = sorted(leaf for leaf in leaves for key in stage.params if leaf == key or leaf.startswith(f"{key}."))
        (traces / f"{stage.name}.json").write_text(json.dumps(reads))


def test_a_removed_dep_and_an_unread_param_are_reported(tmp_path: Path) -> None:
    for package in depcheck.PACKAGES:
        (tmp_path / package).symlink_to(ROOT / package)
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text(yaml.safe_dump(raw))
    traces_reading_everything_declared(tmp_path / "traces", dvc_yaml)
    assert check(dvc_yaml, tmp_path / "traces") == []

    raw["stages"]["fetch"]["deps"].remove("pipelines/stages/fetch.py")
    raw["stages"]["package"]["params"].append("serve.port")
    raw["stages"]["package"]["params"].append("train.num_workers")
    dvc_yaml.write_text(yaml.safe_dump(raw))
    trace = tmp_path / "traces" / "package.json"
    trace.write_text(json.dumps([*json.loads(trace.read_text()), "seed"]))
    assert check(dvc_yaml, tmp_path / "traces") == [
        "fetch: pipelines/stages/fetch.py is imported but not a dep",
        "package: param seed is read but not declared",
        "package: param train.num_workers is declared but never read",
    ]
    assert depcheck.main(["--dvc-yaml", str(dvc_yaml), "--traces", str(tmp_path / "traces")]) == 1
    assert depcheck.main(["--dvc-yaml", str(ROOT / "dvc.yaml")]) == 0


def test_a_whole_section_declared_must_be_read_whole() -> None:
    search = Stage("search@classify", "", (), ("seed", "train.classify", "search.classify.space"))
    reads = {"seed", *(f"train.classify.{k}" for k in TrainConfig.model_fields if k != "epochs")}
    assert param_problems(search, reads, leaf_keys()) == [
        "search@classify: param train.classify.epochs is declared but never read (in section train.classify)",
        "search@classify: param search.classify.space is declared but never read",
    ]
    declared_per_key = Stage("search@classify", "", (), tuple(sorted(reads)))
    assert param_problems(declared_per_key, reads, leaf_keys()) == []
    assert param_problems(Stage("x", "", (), ("train.classify.nope",)), set(), leaf_keys()) == [
        "x: param train.classify.nope is declared but not a key of params.yaml"]


def test_dict_and_list_values_are_single_leaves() -> None:
    leaves = leaf_keys()
    assert {"search.classify.model_space", "search.classify.space.lr", "scenes.scale_range", "seed"} <= leaves
    assert not any(key.startswith("search.classify.model_space.") for key in leaves)


def test_a_task_named_as_pretrained_must_be_a_dep() -> None:
    train = Stage("train@detect", "", ("data/prepared/scenes",), ("train.detect.pretrained",))
    params = {"train": {"detect": {"pretrained": "classify"}}}
    assert depcheck.trunk_problems(train, params) == [
        "train@detect: train.detect.pretrained is classify, so artifacts/models/classify must be a dep"]
    with_trunk = Stage("train@detect", "", ("data/prepared/scenes", "artifacts/models/classify"),
                       ("train.detect.pretrained",))
    assert depcheck.trunk_problems(with_trunk, params) == []
    for other in (None, "torchvision:ResNet18_Weights.IMAGENET1K_V1", "weights/my-model"):
        assert depcheck.trunk_problems(train, {"train": {"detect": {"pretrained": other}}}) == []
