"""What MLflow's UI shows of ConvForge, read back with MlflowClient from a real SQLite store in tmp: the
experiment's kind, logged models named by task and family with their validation and test metrics,
per-class metrics in their own section, described registered models and versions, and the source and
commit of search runs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from mlflow import MlflowClient

from pipelines import tracking
from pipelines.params import MlflowParams
from tests.fixtures import saved_lenet5

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)  # MLflow sets both for subprocesses: undone after the test
    tracking.configure(MlflowParams(tracking_uri="sqlite:///ignored.db", experiment="x",
                                    registered_model_prefix="p"), tmp_path)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    # Later tests (and the DVC stages they start) must not find this store as their registry.
    mlflow.set_registry_uri("")
    mlflow.set_tracking_uri(None)


def test_a_trained_model_is_named_ranked_and_described(store, tmp_path, prepared_classify):
    experiment = tracking.ensure_experiment("convforge")
    client = MlflowClient(store)
    assert client.get_experiment(experiment).tags[tracking.tags.EXPERIMENT_KIND] == "custom_model_development"

    model, data, _, sha = saved_lenet5(tmp_path / "model", prepared_classify)
    with tracking.training_run(experiment, None, "classify", "lenet5") as run_id:
        # As the train stage logs them: per-epoch values, then the selected epoch's (`best_*`, per class too).
        tracking.log_metrics({"val_accuracy": 0.4}, step=1)
        tracking.log_metrics({"best_val_accuracy": 0.5, "best_epoch": 1,
                              "per_class/best_val_accuracy/c0": 0.25})
        card = tracking.ModelCard("classify", "lenet5", "val_accuracy", 0.5, "abc123", sha, epoch=1)
        registration = tracking.register_model(tmp_path / "model", model, data, "p-classify", card)
    tracking.add_to_run(run_id, {"test_accuracy": 0.625, "per_class/test_accuracy/c0": 0.5}, {})

    [model_id] = tracking.logged_models(run_id)
    logged = client.get_logged_model(model_id)
    assert logged.name == "classify-lenet5" and logged.params["family"] == "lenet5"
    linked = {m.key: m.value for m in logged.metrics}
    assert linked["best_val_accuracy"] == 0.5 and linked["test_accuracy"] == 0.625 and linked["val_accuracy"] == 0.4
    assert not any(key.startswith("per_class/") for key in linked)  # the Models tab's columns stay few
    run = client.get_run(run_id)
    assert run.data.metrics["per_class/test_accuracy/c0"] == 0.5
    assert len(client.get_metric_history(run_id, "best_val_accuracy")) == 1  # linking logged no second point
    assert run.data.tags[tracking.tags.GIT_COMMIT] == tracking.git_commit()

    assert "classify" in client.get_registered_model("p-classify").description
    description = client.get_model_version("p-classify", str(registration.version)).description
    assert "family lenet5" in description and "abc123" in description and "val_accuracy 0.5000" in description
    # The promote stage adds the test metrics and its verdict; the card stays.
    tracking.tag_version("p-classify", registration.version, {"test_accuracy": 0.625, "gate": "passed"},
                         description="promoted to champion")
    description = client.get_model_version("p-classify", str(registration.version)).description
    assert description.split("\n\n") == [card.description(), "test: accuracy 0.6250", "promoted to champion"]


def test_search_runs_carry_source_and_commit(store):
    from pipelines.tracking.trial_logger import TrialLogger

    class OneChoice:
        def choice(self, config):
            from pipelines.search_space import TrialChoice

            return TrialChoice("lenet5", {"width": 1}, {"lr": 0.1})

    experiment = tracking.ensure_experiment("trials")
    parent, _ = tracking.open_search(experiment, "classify", "key-1", {"task": "classify"})
    trial = SimpleNamespace(trial_id="t1", experiment_tag="1", config={"family": "lenet5"}, num_failures=0,
                            last_result={})
    TrialLogger(store, experiment, parent, OneChoice(), "val_accuracy", max_epochs=2).on_trial_start(0, [], trial)
    client = MlflowClient(store)
    commit = tracking.git_commit()
    for run_id in (parent, tracking.trial_run(experiment, parent, "t1")):
        run_tags = client.get_run(run_id).data.tags
        assert run_tags[tracking.tags.SOURCE_TYPE] == "LOCAL" and run_tags[tracking.tags.SOURCE_NAME]
        assert run_tags.get(tracking.tags.GIT_COMMIT) == commit


@pytest.fixture()
def ui_params(monkeypatch):
    """Run `python -m pipelines.tracking.ui` in-process on a params.yaml whose store is `set_store(uri)`."""
    from pipelines import params as params_module
    from pipelines.tracking import ui

    def set_store(uri):
        loaded = params_module.load_params()
        mlflow_params = loaded.mlflow.model_copy(update={"tracking_uri": uri})
        monkeypatch.setattr(ui, "load_params", lambda: loaded.model_copy(update={"mlflow": mlflow_params}))

    yield set_store
    mlflow.set_registry_uri("")
    mlflow.set_tracking_uri(None)


def run_ui(monkeypatch, capsys, *args):
    """What `python -m pipelines.tracking.ui ARGS` prints (its stage wrapper left out: it sets SIGTERM's handler)."""
    from pipelines.tracking import ui

    monkeypatch.setattr("sys.argv", ["ui", *args])
    ui.main.__wrapped__()
    return capsys.readouterr().out.strip()


def test_listing_pages_of_a_store_not_made_yet_creates_none(tmp_path, monkeypatch, capsys, ui_params):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "tracking").mkdir()
    uri = f"sqlite:///{tmp_path / 'tracking' / 'runs.db'}"
    ui_params(uri)
    assert run_ui(monkeypatch, capsys) == f"no MLflow store at {uri} yet: run `make repro` first"
    assert not (tmp_path / "tracking" / "runs.db").exists()


def test_pages_and_printed_uri_are_of_the_store_the_stages_use(tmp_path, monkeypatch, capsys, ui_params):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ui_params("sqlite:///tracking/runs.db")
    assert run_ui(monkeypatch, capsys, "--print-uri") == tracking.resolve_uri("sqlite:///tracking/runs.db")
    uri = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert run_ui(monkeypatch, capsys, "--print-uri") == uri
    tracking.use_store(uri)
    experiment_id = tracking.ensure_experiment("convforge")
    lines = run_ui(monkeypatch, capsys, "--url", "http://h:1")
    assert f"http://h:1/#/experiments/{experiment_id}/runs?" in lines


def test_make_ui_serves_the_printed_store():
    recipe = (ROOT / "Makefile").read_text().split("\nui:\n")[1].split("\n\n")[0]
    assert "--print-uri" in recipe and "--backend-store-uri \"$$uri\"" in recipe and "mlflow.db" not in recipe
