"""The cluster recipe as a user runs it: a head started with `ray start --head`, a second node with
`ray start --address`, a real `mlflow server`, and the search and train stages run as commands against them
(RAY_ADDRESS=127.0.0.1:<port>, MLFLOW_TRACKING_URI=http://...). The head uses token authentication, and the
stages get only the token's file (RAY_AUTH_TOKEN_PATH), as a user on a cluster node would have it.

Both nodes run on this machine with 1 CPU each, so the two trials and the two Ray Train workers (DDP over gloo)
run one per node; MLflow must then hold the search's parent run, its trials, the training run with its per-epoch
metrics, and the registered model. Each service is stopped by its own process (`ray start --block` shuts its
node down on SIGTERM): `ray stop` would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipelines.params import Params, validate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EPOCHS = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True)


def wait_for(ready, what: str, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"{what} not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def stop(processes: list[subprocess.Popen], grace_s: float = 15) -> None:
    """SIGTERM to each service's own process group (a Ray node drains, then stops what it started), then SIGKILL
    to the groups still there."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


@pytest.fixture(scope="module")
def cluster():
    """(RAY_ADDRESS, MLFLOW_TRACKING_URI, token file): a two-node `ray start` cluster and an `mlflow server`."""
    # Short paths: Ray's socket paths under --temp-dir must stay under the OS limit of 107 characters.
    work = Path(tempfile.mkdtemp(prefix="cf-cluster-", dir="/tmp"))
    token = work / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
               MLFLOW_DISABLE_TELEMETRY="true")
    gcs, mlflow_port = free_port(), free_port()
    services: list[subprocess.Popen] = []
    try:
        mlflow = start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                        "--artifacts-destination", str(work / "mlartifacts"), "--host", "127.0.0.1",
                        "--port", str(mlflow_port), "--workers", "1"], work / "mlflow.log", env, work)
        services.append(mlflow)
        head = start([str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=1",
                      "--include-dashboard=false", f"--temp-dir={work / 'ray'}", "--disable-usage-stats"],
                     work / "head.log", env, work)
        services.append(head)
        wait_for(lambda: "Ray runtime started" in (work / "head.log").read_text(), "ray head", head, work / "head.log")
        node = start([str(BIN / "ray"), "start", "--block", f"--address=127.0.0.1:{gcs}", "--num-cpus=1",
                      "--disable-usage-stats"], work / "node.log", env, work)
        services.append(node)
        wait_for(lambda: "Ray runtime started" in (work / "node.log").read_text(), "ray node", node, work / "node.log")
        uri = f"http://127.0.0.1:{mlflow_port}"
        wait_for(lambda: answers(f"{uri}/health"), "mlflow server", mlflow, work / "mlflow.log")
        yield f"127.0.0.1:{gcs}", uri, token, work
    finally:
        stop(services)
        shutil.rmtree(work, ignore_errors=True)


def cluster_params(project_params: Params, storage: str) -> dict:
    """A tiny search (lenet5, 2 trials of 1 epoch, 1 CPU each) and a 2-worker training of 2 epochs."""
    raw = project_params.model_dump()
    raw["search"].update(budget="epochs", scheduler="asha", algorithm="optuna", cpus_per_trial=1, gpus_per_trial=0.0,
                         max_concurrent=2, max_failures=0, ray_address=None, storage=storage, max_latency_ms=None)
    raw["search"]["classify"].update(families=["lenet5"], num_samples=2, max_epochs=1, grace_period=1,
                                     time_budget_s=600, train_subset=None)
    raw["search"]["classify"]["space"]["batch_size"] = [32]
    raw["search"]["classify"]["model_space"] = {"lenet5": {"width": [1]}}
    raw["train"].update(device="cpu", amp="off", compile=False, num_threads=1, num_workers=0, workers=2,
                        use_gpu=False)
    raw["train"]["classify"].update(epochs=EPOCHS, warmup_epochs=0)
    return json.loads(json.dumps(validate(Params, raw).model_dump()))


def run_stage(stage: str, project: Path, env: dict[str, str]) -> str:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", f"pipelines.stages.{stage}", "classify"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    print(f"{stage} stage: {time.perf_counter() - started:.1f} s")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


def test_search_and_ray_train_on_a_ray_start_cluster(cluster, project_params, prepared_classify, tmp_path):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    address, uri, token, work = cluster
    project = tmp_path / "project"
    (project / "data" / "prepared").mkdir(parents=True)
    (project / "data" / "prepared" / "classify").symlink_to(prepared_classify)
    storage = (work / "ray_storage").as_uri()  # file://: a URI, as on a shared filesystem
    (project / "params.yaml").write_text(yaml.safe_dump(cluster_params(project_params, storage)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    # No RAY_AUTH_MODE: the stages pick the token up from RAY_AUTH_TOKEN_PATH themselves
    env.update(PYTHONPATH=str(ROOT), RAY_ADDRESS=address, RAY_AUTH_TOKEN_PATH=str(token), MLFLOW_TRACKING_URI=uri)

    search_log = run_stage("search", project, env)
    assert f"connecting to the Ray cluster at {address} (auth token from {token})" in search_log
    best = json.loads((project / "artifacts/search/classify/best.json").read_text())
    train_log = run_stage("train", project, env)
    assert "2 Ray Train workers on CPUs (DDP)" in train_log
    config = json.loads((project / "artifacts/models/classify/config.json").read_text())

    client = MlflowClient(uri)
    parent = client.get_run(best["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 and best["mlflow_run_id"] in {c.info.run_id for c in children}
    assert all(c.data.metrics.get("val_accuracy") is not None for c in children)

    training = client.get_run(config["mlflow_run_id"])
    assert training.info.status == "FINISHED" and training.data.params["workers"] == "2"
    history = client.get_metric_history(training.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))  # from rank 0 only
    assert {"plots"} <= {a.path for a in client.list_artifacts(training.info.run_id)}
    registration = json.loads((project / "artifacts/models/classify/registration.json").read_text())
    version = client.get_model_version(registration["registered_model"], str(registration["registered_version"]))
    assert version.run_id == training.info.run_id
    # the model's files went through the server (no artifact lands on a node's disk but the server's)
    # (a models:/ URI resolves through the global registry URI whatever download_artifacts is given)
    mlflow.set_tracking_uri(uri), mlflow.set_registry_uri(uri)
    try:
        model = Path(download_artifacts(f"models:/{version.name}/{version.version}", dst_path=str(tmp_path / "model")))
    finally:
        mlflow.set_tracking_uri(None), mlflow.set_registry_uri(None)
    assert (model / "MLmodel").is_file() and list(model.rglob("model.safetensors"))
    assert not list((work / "ray_storage").glob("train-classify-*"))  # Ray Train's checkpoints of the done run


def test_auto_trial_resources_are_the_clusters(project_params):
    """`search.cpus_per_trial` and `gpus_per_trial` at `auto` counted the driver's machine: from a head node without
    GPUs (this one) every trial of a GPU cluster trained on the CPU. A cluster of one node declaring 4 CPUs and 2 GPUs
    (Ray takes the counts given) gives each of the 2 concurrent trials 2 CPUs and a GPU, and the search records
    the trials' device as cuda without resolving it here."""
    work = Path(tempfile.mkdtemp(prefix="cf-gpus-", dir="/tmp"))
    token = work / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0")
    gcs, services = free_port(), []
    try:
        head = start([str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4", "--num-gpus=2",
                      "--include-dashboard=false", f"--temp-dir={work / 'ray'}", "--disable-usage-stats"],
                     work / "head.log", env, work)
        services.append(head)
        wait_for(lambda: "Ray runtime started" in (work / "head.log").read_text(), "ray head", head, work / "head.log")
        assert project_params.search.max_concurrent == 2 and project_params.search.gpus_per_trial == "auto"
        script = ("from pipelines.params import load_params\n"
                  "from pipelines.search import recorded_engine, trial_determinism, trial_device, trial_resources\n"
                  "params = load_params('params.yaml')\n"
                  "print(trial_resources(params), trial_device(params)[0], recorded_engine(params)['device'],"
                  " trial_determinism(params))\n")
        env.pop("RAY_AUTH_MODE")
        env.update(PYTHONPATH=str(ROOT), RAY_ADDRESS=f"127.0.0.1:{gcs}")
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.splitlines()[-1] == "(2.0, 1.0) cuda cuda cudnn", done.stdout
    finally:
        stop(services)
        shutil.rmtree(work, ignore_errors=True)
