"""The search on real Ray and a real MLflow store: two nodes, a failing trial, a killed-then-resumed stage, and the
same search twice with its trials finishing in opposite orders (same trials, scores and winner; its trials replay).

Digits 16x16 (the prepared_classify fixture), two small families, 1-2 epochs per trial.
One two-node Ray cluster (`ray.cluster_utils.Cluster`, 1 CPU per node) serves the in-process
searches; the resume test runs the stage as a subprocess on its own local Ray.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from models._registry import Choice
from pipelines.params import Params, validate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ["lenet5", "resnet"]


def tiny_params(project_params: Params, tracking_uri: str, **task_overrides) -> Params:
    """The repo's params with a tiny classify search: 2 families, 4 trials, <= 2 epochs, 1 CPU a trial."""
    raw = project_params.model_dump()
    raw["search"].update(budget="epochs", scheduler="asha", algorithm="optuna", cpus_per_trial=1, gpus_per_trial="auto",
                         max_concurrent=2, max_failures=1, ray_address=None, storage=None, max_latency_ms=None)
    raw["search"]["classify"].update({"families": FAMILIES, "num_samples": 4, "max_epochs": 2, "grace_period": 1,
                                      "time_budget_s": 300, "train_subset": None, **task_overrides})
    raw["search"]["classify"]["space"]["batch_size"] = [32, 64]
    narrowed = raw["search"]["classify"]["model_space"]
    raw["search"]["classify"]["model_space"] = {k: v for k, v in narrowed.items() if k in FAMILIES}
    raw["train"].update(device="cpu", amp="off", compile=False, num_threads=1, num_workers=0)
    raw["mlflow"]["tracking_uri"] = tracking_uri
    return validate(Params, raw)


def children_of(client, parent_id: str) -> list:
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.fixture(scope="module")
def ray_cluster():
    """Two Ray nodes on this machine, 1 CPU each; the test process is the driver."""
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.tuner import init_ray

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 * 2**20})
    cluster.add_node(num_cpus=1, object_store_memory=150 * 2**20)
    cluster.wait_for_nodes()
    init_ray(address=cluster.address)  # the library's cluster path: the project ships as working_dir
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch):
    """A fresh SQLite store in tmp; cwd in tmp so nothing lands in the repo."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def once_two_started(started: Path, config: dict, **kwargs) -> None:
    """The real trial, held until two trials have started (each leaves a file in `started`): the first two then hold
    a CPU each at once, so one runs on each 1-CPU node, however fast they train and however late the second starts."""
    from pipelines.tuner import train_trial

    started.mkdir(exist_ok=True)
    (started / uuid.uuid4().hex).touch()
    deadline = time.monotonic() + 120
    while len(list(started.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    train_trial(config, **kwargs)


def test_search_on_two_nodes_is_tracked_in_mlflow(ray_cluster, project_params, prepared_classify, tmp_path,
                                                  mlflow_store):
    import ray
    from mlflow import MlflowClient

    from pipelines.search import run_search

    params = tiny_params(project_params, mlflow_store)
    out = tmp_path / "artifacts/search/classify"
    trial = functools.partial(once_two_started, tmp_path / "started")  # trials of 2 s could all run on one node
    best = run_search(params, "classify", prepared_classify, out, storage=str(tmp_path / "ray"), trial=trial)

    written = json.loads((out / "best.json").read_text())
    assert written == json.loads(json.dumps(best))
    assert set(written) == {"task", "family", "model", "train", "metric", "score", "trial_id",
                            "mlflow_parent_run_id", "mlflow_run_id", "families", "reproducible"}
    assert written["reproducible"] is True
    assert written["task"] == "classify" and written["metric"] == "val_accuracy"
    assert written["family"] in FAMILIES and 0.0 <= written["score"] <= 1.0
    assert set(written["train"]) == {"optimizer", "lr", "weight_decay", "batch_size", "aug_strength"}
    params.train.classify.updated(**written["train"])  # the train stage can apply it
    assert {row["family"] for row in written["families"]} == set(FAMILIES)  # each family ran at its defaults
    for row in written["families"]:
        assert row["params"] > 0 and row["macs"] > 0 and row["latency_ms"] > 0
    assert (out / "score_vs_latency.png").stat().st_size > 0 and (out / "families.csv").is_file()

    trials = json.loads((out / "families.json").read_text())["trials"]
    assert len(trials) == 4 and all(t["status"] in ("completed", "stopped") for t in trials)
    node_ids = {t["node_id"] for t in trials}
    assert node_ids == {node["NodeID"] for node in ray.nodes() if node["Alive"]}  # both nodes trained trials

    client = MlflowClient(mlflow_store)
    parent = client.get_run(written["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["convforge.winner.family"] == written["family"]
    assert parent.data.params["device"] == "cpu" and parent.data.params["gpus_per_trial"] == "0.0"  # auto, no GPU
    assert parent.data.metrics["best_score"] == pytest.approx(written["score"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best.json", "families.csv", "score_vs_latency.png", "families_table.json"} <= artifacts
    children = children_of(client, parent.info.run_id)
    assert len(children) == 4 and written["mlflow_run_id"] in {c.info.run_id for c in children}
    by_trial = {c.data.tags["convforge.trial_id"]: c for c in children}
    assert set(by_trial) == {t["trial_id"] for t in trials}
    for trial in trials:
        child = by_trial[trial["trial_id"]]
        assert child.info.status == "FINISHED" and child.data.params["family"] == trial["family"]
        assert child.data.tags["convforge.trial_state"] == trial["status"]
        assert child.data.tags["convforge.device"].startswith("cpu (")  # the device the trial resolved
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [m.step for m in history] == list(range(1, trial["epochs"] + 1))  # every epoch, once


def test_failing_trial_is_retried_reported_and_the_search_goes_on(ray_cluster, project_params, prepared_classify,
                                                                  tmp_path, mlflow_store):
    from mlflow import MlflowClient

    from pipelines.search import run_search
    from pipelines.search_space import SearchSpace

    params = tiny_params(project_params, mlflow_store, num_samples=2, max_epochs=1)
    space = SearchSpace.build("classify", FAMILIES, params.search.classify.space,
                              params.search.classify.model_space)
    # An invalid hyperparameter: every lenet5 trial raises in models.build on the worker.
    broken = replace(space, families={**space.families, "lenet5": {**space.families["lenet5"],
                                                                   "no_such_hparam": Choice([1])}})
    out = tmp_path / "out"
    best = run_search(params, "classify", prepared_classify, out, storage=str(tmp_path / "ray"), space=broken)

    assert best["family"] == "resnet"
    trials = {t["family"]: t for t in json.loads((out / "families.json").read_text())["trials"]}
    assert trials["lenet5"]["status"] == "error" and "no_such_hparam" in trials["lenet5"]["error"]
    assert trials["resnet"]["status"] == "completed"
    lenet = next(row for row in best["families"] if row["family"] == "lenet5")
    assert lenet["score"] is None

    client = MlflowClient(mlflow_store)
    failed = [c for c in children_of(client, best["mlflow_parent_run_id"]) if c.data.params["family"] == "lenet5"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert failed[0].data.tags["convforge.retries"] == "1"  # max_failures = 1: one retry, then given up
    assert "no_such_hparam" in failed[0].data.tags["convforge.error"]


def halving_search(project_params: Params, mlflow_store: str, prepared: Path, tmp_path: Path,
                   **search: object) -> tuple[dict, list[dict], dict[str, list]]:
    """The stage's search of 6 trials of <= 3 epochs, reduction factor 3, with the `search` settings given:
    best.json, its trials, and each trial's val_accuracy history in MLflow."""
    from mlflow import MlflowClient

    from pipelines.search import run_search

    raw = tiny_params(project_params, mlflow_store, num_samples=6, max_epochs=3).model_dump()
    raw["search"].update(reduction_factor=3, **search)
    out = tmp_path / "out"
    best = run_search(validate(Params, raw), "classify", prepared, out, storage=str(tmp_path / "ray"))
    trials = json.loads((out / "families.json").read_text())["trials"]
    client = MlflowClient(mlflow_store)
    children = {c.data.tags["convforge.trial_id"]: c for c in children_of(client, best["mlflow_parent_run_id"])}
    histories = {t["trial_id"]: client.get_metric_history(children[t["trial_id"]].info.run_id, "val_accuracy")
                 for t in trials}
    return best, trials, histories


def test_search_with_promotions_resumes_the_top_trials_and_tracks_each_epoch_once(ray_cluster, project_params,
                                                                                 prepared_classify, tmp_path,
                                                                                 mlflow_store):
    """scheduler asha_promote (budget time): 6 trials pause after epoch 1, the top 2 resume from their checkpoints
    for epochs 2-3 (on either node), the other 4 stop; each trial's MLflow run holds every epoch it trained once."""
    best, trials, histories = halving_search(project_params, mlflow_store, prepared_classify, tmp_path,
                                             budget="time", scheduler="asha_promote")
    assert sorted((t["status"], t["epochs"]) for t in trials) == [("completed", 3)] * 2 + [("stopped", 1)] * 4
    firsts = sorted((t["score"] for t in trials if t["status"] == "stopped"), reverse=True)
    for trial in trials:
        history = histories[trial["trial_id"]]
        assert [m.step for m in history] == list(range(1, trial["epochs"] + 1))  # resumed: no epoch twice
        if trial["status"] == "completed":  # promoted: its first epoch ranked above every stopped trial's
            assert history[0].value >= firsts[0]
    assert best["trial_id"] in {t["trial_id"] for t in trials if t["status"] == "completed"}


def test_synchronous_halving_under_budget_epochs_keeps_the_top_of_the_whole_rung(ray_cluster, project_params,
                                                                                 prepared_classify, tmp_path,
                                                                                 mlflow_store):
    """scheduler sha (budget epochs): all 6 trials are drawn up front and pause after epoch 1; once all hold a
    score, the top 2 resume for epochs 2-3 and the other 4 stop as halved, so the search is reproducible."""
    best, trials, histories = halving_search(project_params, mlflow_store, prepared_classify, tmp_path,
                                             budget="epochs", scheduler="sha")
    assert sorted((t["status"], t["epochs"]) for t in trials) == [("completed", 3)] * 2 + [("stopped", 1)] * 4
    assert best["reproducible"] and best["trial_id"] in {t["trial_id"] for t in trials if t["status"] == "completed"}
    firsts = {trial_id: history[0].value for trial_id, history in histories.items()}  # in the order drawn
    kept = sorted(firsts, key=lambda trial: -firsts[trial])[:2]  # the top third of all six first epochs
    assert {t["trial_id"] for t in trials if t["status"] == "completed"} == set(kept)


def order_marker(data_root: str, family: str) -> Path:
    """A file that says a `family` trial of this test session has finished (driver and workers agree on it)."""
    session = hashlib.sha256(data_root.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"convforge-order-{session}-{family}-done"


def finishing_first(family: str, config: dict, **kwargs) -> None:
    """The real trial, delayed so that a `family` trial finishes first: the others start once one has finished."""
    from pipelines.tuner import train_trial

    marker = order_marker(kwargs["data"].root, family)
    deadline = time.monotonic() + 120
    while config["family"] != family and not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    train_trial(config, **kwargs)
    if config["family"] == family:
        marker.touch()


def lenet5_first(config: dict, **kwargs) -> None:
    finishing_first("lenet5", config, **kwargs)


def resnet_first(config: dict, **kwargs) -> None:
    finishing_first("resnet", config, **kwargs)


@pytest.fixture(scope="module")
def two_orders(ray_cluster, project_params, prepared_classify, tmp_path_factory):
    """The same search twice on the two nodes, once with a lenet5 trial finishing first, once with a resnet trial
    finishing first; each in its own MLflow store. Returns {name: (best.json, families.json, MLflow URI)}."""
    from pipelines.search import run_search

    searches = {}
    for name, trial in (("lenet5_first", lenet5_first), ("resnet_first", resnet_first)):
        root = tmp_path_factory.mktemp(name)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        with pytest.MonkeyPatch.context() as patch:
            patch.delenv("MLFLOW_TRACKING_URI", raising=False)
            patch.chdir(root)
            best = run_search(tiny_params(project_params, uri), "classify", prepared_classify, root / "out",
                              storage=str(root / "ray"), trial=trial, log=lambda message: None)
        searches[name] = (best, json.loads((root / "out" / "families.json").read_text()), uri)
    for family in FAMILIES:
        order_marker(str(prepared_classify.resolve()), family).unlink(missing_ok=True)
    return searches


def finishing_order(uri: str, parent_id: str) -> list[int]:
    """The trials' indices in the order their child runs ended."""
    from mlflow import MlflowClient

    children = children_of(MlflowClient(uri), parent_id)
    return [int(c.data.params["trial_index"]) for c in sorted(children, key=lambda c: c.info.end_time)]


def test_reversed_finishing_order_gives_the_same_trials_scores_and_winner(two_orders):
    (first, first_table, first_uri), (second, second_table, second_uri) = two_orders.values()
    # Trial 0 (lenet5) and trial 1 (resnet), the families' starting points, finished in opposite orders.
    first_order = finishing_order(first_uri, first["mlflow_parent_run_id"])
    second_order = finishing_order(second_uri, second["mlflow_parent_run_id"])
    assert first_order.index(0) < first_order.index(1) and second_order.index(1) < second_order.index(0)

    def outcome(trial: dict) -> tuple:
        return (trial["index"], trial["family"], trial["hparams"], trial["train"], trial["status"], trial["score"],
                trial["epochs"])

    assert [outcome(t) for t in first_table["trials"]] == [outcome(t) for t in second_table["trials"]]
    assert [t["index"] for t in first_table["trials"]] == [0, 1, 2, 3]
    same = ("family", "model", "train", "score")
    assert {k: first[k] for k in same} == {k: second[k] for k in same}
    assert [(f["family"], f["score"]) for f in first["families"]] == [(f["family"], f["score"]) for f in
                                                                      second["families"]]
    assert first["reproducible"] and second["reproducible"]


def test_a_recorded_trial_replays_to_its_recorded_scores(two_orders, prepared_classify):
    """`pipelines.replay` by trial id: the trial rebuilt from MLflow, retrained for its epochs, equal scores."""
    from mlflow import MlflowClient

    from pipelines import tracking
    from pipelines.replay import replay

    best, table, uri = two_orders["lenet5_first"]
    tracking.use_store(uri)
    stopped = [t for t in table["trials"] if t["status"] == "stopped"]
    for trial in [next(t for t in table["trials"] if t["trial_id"] == best["trial_id"]), *stopped[:1]]:
        outcome = replay(trial["trial_id"], prepared_classify, log=lambda message: None)
        assert outcome.exact and outcome.matches, outcome.differences()
        assert outcome.replayed["trial_score"] == trial["score"]
        assert len(outcome.compared) == trial["epochs"] + 1  # every epoch's score, and the final one
        run = MlflowClient(uri).get_run(outcome.run_id)
        assert run.data.tags["convforge.replay_of"] == outcome.original
        assert run.info.experiment_id == MlflowClient(uri).get_run(outcome.original).info.experiment_id


def test_trial_vs_final_bench_trains_each_trial_as_the_train_stage_would(two_orders, prepared_classify, tmp_path,
                                                                       capsys):
    """bench/trial_vs_final.py on a recorded search: at the search's epochs on its items, every trial's final run
    passes through the trial's score after the epochs the trial reached; a rerun trains nothing; a second seed
    trains each trial once more, differently, and ranks the two seeds' mean; `--budgets` trains each trial again
    as a search trial (at the search's own budget: to the search's scores) and ranks those scores too."""
    from bench import trial_vs_final as bench

    best, table, _ = two_orders["lenet5_first"]
    search = tmp_path / "search"
    search.mkdir()
    (search / "best.json").write_text(json.dumps(best))
    (search / "families.json").write_text(json.dumps(table))
    argv = ["--search", str(search), "--data", str(prepared_classify), "--out", str(tmp_path / "out.json"),
            "--epochs", "2", "--threads", "1"]  # tiny_params: 2 epochs on every training item
    bench.main(argv)
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["complete"] and len(result["rows"]) == len(table["trials"]) == 4
    for row in result["rows"]:
        assert len(row["final_val_scores"]) == 2 and row["final_val_score"] == max(row["final_val_scores"])
        assert row["final_val_scores"][row["trial_epochs"] - 1] == pytest.approx(row["trial_score"], abs=1e-6)
        assert 0 <= row["final_test_score"] <= 1
    assert [row["trial_score"] for row in result["rows"]] == sorted((t["score"] for t in table["trials"]),
                                                                     reverse=True)
    ranks = result["ranks"]
    assert ranks["trials"] == 4 and -1 <= ranks["spearman_rho"] <= 1 and 1 <= ranks["winner_final_rank"] <= 4
    capsys.readouterr()
    bench.main(argv)  # the same search and settings: every row read back, none retrained
    assert "training 2 epochs" not in capsys.readouterr().out
    assert json.loads((tmp_path / "out.json").read_text())["rows"] == result["rows"]

    bench.main([*argv, "--seeds", "2"])  # one more seed: only it is trained, each trial once
    assert capsys.readouterr().out.count("training 2 epochs") == 4
    seeded = json.loads((tmp_path / "out.json").read_text())
    assert seeded["complete"] and seeded["seeds"] == 2
    for before, row in zip(result["rows"], seeded["rows"]):
        assert {key: row[key] for key in before if key != "replicates"} == {  # the default seed's run, read back
            key: value for key, value in before.items() if key != "replicates"}
        (again,) = row["replicates"]
        assert again["seed"] == result["seed"] + 1 and len(again["final_val_scores"]) == 2
        assert row["final_test_mean"] == pytest.approx((row["final_test_score"] + again["final_test_score"]) / 2)
    assert any(row["replicates"][0]["final_val_scores"] != row["final_val_scores"] for row in seeded["rows"])
    assert seeded["ranks"] == ranks and seeded["seed_mean"]["seeds"] == 2
    assert -1 <= seeded["seed_mean"]["spearman_rho"] <= 1 and seeded["seed_mean"]["pooled_sd"] >= 0
    rhos = seeded["seed_mean"]["val_epoch_rhos"]  # one per final epoch: val after it against the mean test score
    assert len(rhos) == 2 and all(rho is None or -1 <= rho <= 1 for rho in rhos)
    bench.main(argv)  # without --seeds: the two seeds the results hold, read back
    assert "training 2 epochs" not in capsys.readouterr().out
    assert json.loads((tmp_path / "out.json").read_text()) == seeded

    bench.main([*argv, "--budgets", "allx2,ALLx1"])  # every trial again as a search trial, at two budgets
    trained = [line for line in capsys.readouterr().out.splitlines() if line.startswith("budget all")]
    assert len(trained) == 2 * 4  # a line per trial trained
    budgets = json.loads((tmp_path / "out.json").read_text())
    assert budgets["rows"] == seeded["rows"] and budgets["command"].endswith("--budgets allx2,allx1 --threads 1")
    again, one_epoch = budgets["budgets"]
    for row in budgets["rows"]:  # the search's own budget: each trial's score after the epochs it reached
        assert again["scores"][row["trial_id"]][row["trial_epochs"] - 1] == pytest.approx(row["trial_score"], abs=1e-6)
        assert len(one_epoch["scores"][row["trial_id"]]) == 1 and one_epoch["seconds"][row["trial_id"]] >= 0
    assert [entry["trial_items"] for entry in (again, one_epoch)] == [2 * budgets["train_items"],
                                                                      budgets["train_items"]]
    for entry in (again, one_epoch):
        assert entry["scores"][entry["top_trial"]][-1] == max(scores[-1] for scores in entry["scores"].values())
        assert -1 <= entry["ranks"]["spearman_rho"] <= 1 and -1 <= entry["seed_mean"]["spearman_rho"] <= 1
    bench.main(argv)  # without --budgets: the budgets the results hold, read back, none trained
    assert "trial(s) at budgets" not in capsys.readouterr().out
    assert json.loads((tmp_path / "out.json").read_text()) == budgets


def test_killed_search_resumes_without_rerunning_finished_trials(project_params, prepared_classify, tmp_path):
    """Run the stage, SIGKILL it once a trial has finished, rerun it: the search completes from where it was."""
    from mlflow import MlflowClient

    from pipelines import scratch
    from pipelines.tuner import TRIAL_SCRATCH

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = tiny_params(project_params, tracking_uri, num_samples=4)
    raw = params.model_dump()
    raw["search"]["max_concurrent"] = 1  # one trial at a time: the kill lands between trials' progress
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/classify").symlink_to(prepared_classify)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "pipelines.stages.search", "classify"]
    client = MlflowClient(tracking_uri)

    def finished_children() -> dict[str, int]:
        """trial id -> number of val_accuracy points, for child runs that are FINISHED."""
        if not (tmp_path / "mlflow.db").exists():
            return {}
        try:
            runs = client.search_runs(
                [e.experiment_id for e in client.search_experiments()],
                filter_string="attributes.status = 'FINISHED' and tags.`convforge.trial_id` != ''")
        except Exception:  # the store is still being created by the stage
            return {}
        return {r.data.tags["convforge.trial_id"]: len(client.get_metric_history(r.info.run_id, "val_accuracy"))
                for r in runs}

    host, temp = socket.gethostname(), Path(tempfile.gettempdir())

    def trial_folders(known: set[Path]) -> dict[Path, int]:
        """This machine's trial checkpoint folders in the temp folder, other than `known` -> their process."""
        return {path: pid for path in temp.glob(f"{TRIAL_SCRATCH}{host}-*")
                if path not in known and (pid := scratch.owner(path.name, TRIAL_SCRATCH, host))}

    before = set(trial_folders(set()))
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.monotonic() + 240
    done: dict[str, int] = {}
    while time.monotonic() < deadline and first.poll() is None and not done:
        time.sleep(1)
        done = finished_children()
    assert first.poll() is None, "the first run ended before it could be interrupted:\n" + \
        (tmp_path / "first.log").read_text()[-3000:]
    assert done, "no trial finished in time:\n" + (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray it started
    first.wait()
    log.close()
    # The trial killed mid-way leaves its checkpoint folder (its clean-up never ran) once its Ray worker has ended
    # too; the resumed search's trials sweep it. Other tests' trials, still running, keep theirs.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(scratch.running(pid) for pid in trial_folders(before).values()):
        time.sleep(0.5)
    left = [path for path, pid in trial_folders(before).items() if not scratch.running(pid)]
    done = finished_children()
    assert len(done) < 4 and not (tmp_path / "artifacts/search/classify/best.json").exists()

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming the search" in second.stdout
    assert not [path for path in left if path.exists()]
    best = json.loads((tmp_path / "artifacts/search/classify/best.json").read_text())
    trials = json.loads((tmp_path / "artifacts/search/classify/families.json").read_text())["trials"]
    assert len(trials) == 4 and best["trial_id"] in {t["trial_id"] for t in trials}
    after = finished_children()
    assert len(after) == 4
    assert set(done) <= {t["trial_id"] for t in trials}  # finished trials are kept...
    for trial_id, points in done.items():
        assert after[trial_id] == points  # ...and not trained again
    # The resumed search logged into the same parent: one child per trial, all closed. A trial that the
    # killed driver started after Tune's last state snapshot is drawn anew; its child run ends as `lost`.
    children = children_of(client, best["mlflow_parent_run_id"])
    by_trial = {}
    for child in children:
        by_trial.setdefault(child.data.tags["convforge.trial_id"], []).append(child)
    assert all(len(runs) == 1 for runs in by_trial.values())
    assert {t["trial_id"] for t in trials} <= set(by_trial)
    for trial_id, (child,) in by_trial.items():
        if trial_id in {t["trial_id"] for t in trials}:
            assert child.info.status == "FINISHED"
        else:
            assert child.info.status == "KILLED" and child.data.tags["convforge.trial_state"] == "lost"
