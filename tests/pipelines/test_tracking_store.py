"""Where the MLflow store is: relative paths are taken from the main workspace, also from the copy of the
project that `dvc exp run --temp`/`--queue` runs in (`<workspace>/.dvc/tmp/exps/...`, deleted afterwards)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pipelines.tracking.store as store_module
from pipelines import tracking
from pipelines.params import MlflowParams


def experiment_copy(workspace, *folders):
    """A fake DVC 3.x experiment copy of `workspace` (as DVC lays it out), with its own params.yaml."""
    copy = workspace.joinpath(".dvc", "tmp", "exps", *folders)
    copy.mkdir(parents=True)
    (copy / "params.yaml").write_text("mlflow: {}\n")
    return copy


def test_the_workspace_of_a_temp_or_queued_experiment_copy_is_the_one_holding_its_dvc_folder(tmp_path):
    workspace = tmp_path / "project"
    temp, queued = experiment_copy(workspace, "standalone", "tmpab12cd"), experiment_copy(workspace, "tmpef34gh")
    assert tracking.workspace_root(temp) == workspace.resolve()
    assert tracking.workspace_root(queued) == workspace.resolve()
    assert tracking.workspace_root(workspace) == workspace.resolve()
    assert tracking.workspace_root(tmp_path / "exps" / "tmp") == (tmp_path / "exps" / "tmp").resolve()


def test_a_relative_store_of_an_experiment_copy_is_the_workspaces_store(tmp_path, monkeypatch):
    workspace = tmp_path / "project"
    copy = experiment_copy(workspace, "standalone", "tmpab12cd")
    store = f"sqlite:///{workspace.resolve() / 'mlflow.db'}"
    assert tracking.resolve_uri("sqlite:///mlflow.db", copy) == store
    assert tracking.resolve_uri("mlruns", copy) == (workspace.resolve() / "mlruns").as_uri()
    assert tracking.resolve_uri("sqlite:////abs/m.db", copy) == "sqlite:////abs/m.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = MlflowParams(tracking_uri="sqlite:///mlflow.db", experiment="e", registered_model_prefix="p")
    assert tracking.store_uri(params, copy) == store


def test_the_store_module_run_from_an_experiment_copy_uses_the_workspaces_store(tmp_path, monkeypatch):
    """store.py as DVC runs it in a temp experiment: its own file in the copy, so PROJECT_ROOT is the copy."""
    workspace = tmp_path / "project"
    copy = experiment_copy(workspace, "standalone", "tmpab12cd")
    (copy / "pipelines" / "tracking").mkdir(parents=True)
    shutil.copy(Path(store_module.__file__), copy / "pipelines" / "tracking" / "store.py")
    spec = importlib.util.spec_from_file_location("copied_store", copy / "pipelines" / "tracking" / "store.py")
    copied = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copied)
    assert copied.PROJECT_ROOT == copy.resolve()
    store = f"sqlite:///{workspace.resolve() / 'mlflow.db'}"
    assert copied.resolve_uri("sqlite:///mlflow.db") == store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = MlflowParams(tracking_uri="sqlite:///mlflow.db", experiment="e", registered_model_prefix="p")
    assert copied.store_uri(params) == store
    assert copied.workspace_root() == workspace.resolve()  # where search's ray_results belong too
