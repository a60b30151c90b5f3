"""The tracking package against a real MLflow SQLite store in tmp: URIs, experiments, names, data hashes,
the models-from-code pyfunc and the `champion` alias."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipelines import tracking
from tests.fixtures import saved_lenet5
from pipelines.params import MlflowParams


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.fixture()
def store(store_dir, monkeypatch):
    """One SQLite store for the module (creating its tables takes seconds), reached through the env."""
    import mlflow

    uri = f"sqlite:///{store_dir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.configure(MlflowParams(tracking_uri="sqlite:///ignored.db", experiment="x",
                                    registered_model_prefix="p"), store_dir)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


def test_relative_store_paths_resolve_against_the_project_root_and_the_env_wins(tmp_path, monkeypatch):
    assert tracking.resolve_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.resolve_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert tracking.resolve_uri("mlruns", tmp_path) == (tmp_path / "mlruns").as_uri()
    assert tracking.resolve_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    params = MlflowParams(tracking_uri="sqlite:///mlflow.db", experiment="e", registered_model_prefix="p")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.configure(params, tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.configure(params, tmp_path) == "http://127.0.0.1:5999"


def test_sanitized_names_are_accepted_by_mlflow(store):
    import mlflow
    from mlflow import MlflowClient

    names = ["map@.5", "AP(T-shirt/top)", "/leading", "../up", "ok_name-1.2 x"]
    clean = [tracking.sanitize(n) for n in names]
    assert clean[0] == "map_.5" and clean[1] == "AP_T-shirt/top_" and clean[4] == "ok_name-1.2 x"
    experiment = tracking.ensure_experiment("names")
    with mlflow.start_run(experiment_id=experiment) as run:
        tracking.log_metrics({n: float(i) for i, n in enumerate(names)} | {"nan": math.nan, "flag": True})
    logged = MlflowClient(store).get_run(run.info.run_id).data.metrics
    assert set(logged) == set(clean)  # NaN and non-numbers are left out


def test_flatten_nests_with_dots():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}


def test_experiment_is_created_once_with_artifacts_next_to_the_database(store, store_dir):
    from mlflow import MlflowClient

    first = tracking.ensure_experiment("convforge")
    assert tracking.ensure_experiment("convforge") == first
    location = MlflowClient(store).get_experiment(first).artifact_location
    assert location == (store_dir / "mlartifacts").as_uri()


def test_data_hash_prefers_dvc_lock_and_else_hashes_the_files(tmp_path):
    data = tmp_path / "data" / "prepared" / "classify"
    data.mkdir(parents=True)
    (data / "train.npz").write_bytes(b"one")
    first = tracking.data_hash(data, tmp_path)
    assert first.startswith("sha256:") and first == tracking.data_hash(data, tmp_path)
    (data / "train.npz").write_bytes(b"two")
    assert tracking.data_hash(data, tmp_path) != first
    lock = {"schema": "2.0", "stages": {"augment": {"cmd": "x", "outs": [
        {"path": "data/prepared/classify", "md5": "0123abcd.dir", "size": 3, "nfiles": 1}]}}}
    (tmp_path / "dvc.lock").write_text(json.dumps(lock))  # JSON is YAML
    assert tracking.data_hash(data, tmp_path) == "0123abcd.dir"


def test_pyfunc_from_code_round_trip_and_champion_alias(store, tmp_path, prepared_classify):
    import mlflow
    from mlflow import MlflowClient

    from pipelines.engine import EngineSettings, predict

    model, data, folder, _ = saved_lenet5(tmp_path / "model", prepared_classify)
    settings = EngineSettings(device="cpu", channels_last=False)
    example = data.images[:2].numpy()
    expected = predict(model, "classify", data.images[:5], data.mean, data.std, settings).numpy()
    experiment = tracking.ensure_experiment("models")
    versions = []
    for _ in range(3):
        with mlflow.start_run(experiment_id=experiment):
            versions.append(tracking.log_model(folder, example, expected[:2], "p-classify").version)
    client = MlflowClient(store)
    assert [int(v) for v in versions] == [1, 2, 3]
    # No pickled module: the logged model is the code file plus the safetensors/JSON folder.
    source = client.get_model_version("p-classify", versions[0]).source
    local = mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path / "logged"))
    files = {p.name for p in Path(local).rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "mlflow_model.py", "MLmodel"} <= files
    assert not any(name.endswith((".pkl", ".pickle", ".pt")) for name in files)

    loaded = mlflow.pyfunc.load_model(f"models:/p-classify/{versions[0]}")
    np.testing.assert_allclose(loaded.predict(data.images[:5].numpy()), expected, rtol=1e-5, atol=1e-6)
    assert loaded.metadata.get_input_schema() is not None

    # The alias moves only through the promotion gate (tests/integration/test_promotion.py has its rules).
    tracking.set_champion("p-classify", versions[1])
    assert tracking.champion("p-classify").version == int(versions[1])
    assert client.get_model_version_by_alias("p-classify", "champion").version == versions[1]


class OneChoice:
    """A search space whose every trial chose lenet5 with width 1 and lr 0.1."""

    def choice(self, config):
        from pipelines.search_space import TrialChoice

        return TrialChoice("lenet5", {"width": 1}, {"lr": 0.1})


def test_trial_logger_logs_each_trial_as_a_child_run_without_rays_bookkeeping(store):
    import pickle

    from mlflow import MlflowClient

    from pipelines.tracking.trial_logger import TrialLogger

    experiment = tracking.ensure_experiment("trials")
    parent, complete = tracking.open_search(experiment, "classify", "key-1", {"task": "classify", "seed": 1})
    assert not complete and tracking.open_search(experiment, "classify", "key-1", {}) == (parent, False)
    trial = SimpleNamespace(trial_id="t1", experiment_tag="1_family=lenet5", config={"family": "lenet5"},
                            num_failures=0, last_result={"epoch": 2})
    logger = TrialLogger(store, experiment, parent, OneChoice(), "val_accuracy", max_epochs=2)
    result = {"val_accuracy": 0.5, "train_loss": 1.0, "score": 0.5, "epoch": 1, "node_id": "n1", "node_ip": "1.2.3.4",
              "device": "cpu (2 cores, 2 threads); amp off",
              "timestamp": 1_700_000_000, "time_this_iter_s": 2.0, "time_total_s": 2.0, "training_iteration": 1,
              "pid": 123, "done": False, "trial_id": "t1"}
    logger.on_trial_start(0, [], trial)
    logger.on_trial_result(0, [], trial, result)
    logger.on_trial_complete(0, [], trial)

    run_id = tracking.trial_run(experiment, parent, "t1")
    run = MlflowClient(store).get_run(run_id)
    assert set(run.data.metrics) == {"val_accuracy", "train_loss", "score", "epoch_time_s"}
    assert run.data.params == {"family": "lenet5", "model.width": "1", "train.lr": "0.1", "trial_index": "0"}
    assert run.data.tags["convforge.trial_state"] == "completed" and run.info.status == "FINISHED"
    assert run.data.tags["convforge.node_id"] == "n1"
    assert run.data.tags["convforge.device"] == "cpu (2 cores, 2 threads); amp off"
    assert pickle.loads(pickle.dumps(logger)).run_id(trial) == run_id  # a restored search finds its runs

    tracking.mark_complete(parent)
    assert tracking.open_search(experiment, "classify", "key-1", {}) == (parent, True)


def git_repo(folder: Path) -> Path:
    """A git repository in `folder` with one committed file, params.yaml."""
    import subprocess

    folder.mkdir()
    (folder / "params.yaml").write_text("lr: 0.1\n")
    author = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for command in (["init", "-q"], ["add", "params.yaml"], [*author, "commit", "-q", "-m", "one"]):
        subprocess.run(["git", *command], cwd=folder, check=True)
    return folder


def test_source_tags_say_whether_params_or_code_changed_and_which_dvc_experiment_ran(tmp_path, monkeypatch):
    import subprocess

    from pipelines.tracking.runs import source_tags

    repo = git_repo(tmp_path / "repo")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    clean = source_tags(repo)
    assert clean[tracking.tags.GIT_DIRTY] == "false" and tracking.tags.DVC_EXP not in clean
    (repo / "dvc.lock").write_text("schema: '2.0'\n")  # a repro's own records are no change of its inputs
    subprocess.run(["git", "add", "dvc.lock"], cwd=repo, check=True)
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert source_tags(repo)[tracking.tags.GIT_DIRTY] == "false"
    (repo / "params.yaml").write_text("lr: 0.5\n")  # what `dvc exp run -S lr=0.5` does to the baseline's tree
    monkeypatch.setenv("DVC_EXP_NAME", "ruddy-rant")
    dirty = source_tags(repo)
    assert dirty[tracking.tags.GIT_DIRTY] == "true" and dirty[tracking.tags.DVC_EXP] == "ruddy-rant"
    assert dirty[tracking.tags.GIT_COMMIT] == clean[tracking.tags.GIT_COMMIT]
    assert tracking.tags.GIT_DIRTY not in source_tags(tmp_path)  # outside git: no commit, nothing to differ from


def test_training_runs_search_runs_and_registered_versions_carry_the_tree_tags(store, tmp_path, monkeypatch,
                                                                               prepared_classify):
    from mlflow import MlflowClient

    from pipelines.tracking.lineage import RUN_INPUTS, has_changes
    from pipelines.tracking.trial_logger import TrialLogger

    monkeypatch.setenv("DVC_EXP_NAME", "ruddy-rant")
    dirty = str(has_changes(paths=RUN_INPUTS)).lower()
    expected = {tracking.tags.GIT_DIRTY: dirty, tracking.tags.DVC_EXP: "ruddy-rant"}
    experiment = tracking.ensure_experiment("tree")
    model, data, folder, sha = saved_lenet5(tmp_path / "model", prepared_classify)
    with tracking.training_run(experiment, None, "classify", "lenet5") as run_id:
        card = tracking.ModelCard("classify", "lenet5", "val_accuracy", 0.5, "abc123", sha)
        registration = tracking.register_model(folder, model, data, "p-tree", card)
    parent, _ = tracking.open_search(experiment, "classify", "key-tree", {"task": "classify"})
    trial = SimpleNamespace(trial_id="t9", experiment_tag="1", config={}, num_failures=0, last_result={})
    TrialLogger(store, experiment, parent, OneChoice(), "val_accuracy", max_epochs=2).on_trial_start(0, [], trial)
    client = MlflowClient(store)
    for run in (run_id, parent, tracking.trial_run(experiment, parent, "t9")):
        assert expected.items() <= client.get_run(run).data.tags.items(), run
    version = client.get_model_version("p-tree", str(registration.version))
    assert expected.items() <= version.tags.items()


def test_an_interrupted_training_run_ends_killed_and_a_failed_one_failed(store):
    from mlflow import MlflowClient

    from pipelines.errors import Terminated

    experiment = tracking.ensure_experiment("interrupted")
    ended = {}
    for error in (KeyboardInterrupt, Terminated, ValueError):
        with pytest.raises(error):
            with tracking.training_run(experiment, None, "classify", "lenet5") as run_id:
                ended[error] = run_id
                raise error()
    status = {error: MlflowClient(store).get_run(run_id).info.status for error, run_id in ended.items()}
    assert status == {KeyboardInterrupt: "KILLED", Terminated: "KILLED", ValueError: "FAILED"}
    with tracking.training_run(experiment, ended[KeyboardInterrupt], "classify", "lenet5"):  # the rerun resumes it
        pass
    assert MlflowClient(store).get_run(ended[KeyboardInterrupt]).info.status == "FINISHED"


def test_an_interrupted_searchs_open_trials_end_killed_and_run_again_when_resumed(store):
    from mlflow import MlflowClient

    from pipelines.tracking.trial_logger import TrialLogger

    experiment = tracking.ensure_experiment("interrupted-search")
    parent, _ = tracking.open_search(experiment, "classify", "key-stop", {"task": "classify"})
    logger = TrialLogger(store, experiment, parent, OneChoice(), "val_accuracy", max_epochs=2)
    trials = [SimpleNamespace(trial_id=f"s{i}", experiment_tag=str(i), config={}, num_failures=0,
                              last_result={"epoch": 2}) for i in range(3)]
    for trial in trials:
        logger.on_trial_start(0, [], trial)
    logger.on_trial_complete(0, [], trials[0])
    client = MlflowClient(store)
    runs = [tracking.trial_run(experiment, parent, trial.trial_id) for trial in trials]

    assert sorted(tracking.end_open_trials(parent)) == sorted(runs[1:])
    status = [client.get_run(run).info.status for run in runs]
    assert status == ["FINISHED", "KILLED", "KILLED"]
    assert [client.get_run(run).data.tags[tracking.tags.TRIAL_STATE] for run in runs] == [
        "completed", "interrupted", "interrupted"]
    assert client.get_run(parent).info.status == "RUNNING"  # the search's own run is search.py's to end
    assert tracking.end_open_trials(parent) == []
    logger.on_trial_start(0, [], trials[1])  # a rerun resumes the trial in its run
    assert client.get_run(runs[1]).info.status == "RUNNING"
