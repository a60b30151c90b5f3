"""Joining Ray as a user's cluster needs it: which stores a cluster of several machines cannot use, where the auth
token comes from, and the one-line stops (pipelines/cluster.py). The real `ray start` cluster is
tests/integration/test_cluster_cli.py. A Ray worker that Ray ends prints no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import cluster, runtime, scratch
from pipelines.errors import ConvForgeError

HERE = "10.0.0.1"
ROOT = Path(__file__).resolve().parents[2]


def node(ip: str, alive: bool = True) -> dict:
    return {"NodeManagerAddress": ip, "Alive": alive}


def test_a_cluster_spans_machines_when_a_live_node_is_elsewhere_or_through_ray_client() -> None:
    assert not cluster.spans_machines([node(HERE), node(HERE)], HERE, "10.0.0.1:6379")  # two nodes, one machine
    assert not cluster.spans_machines([node(HERE), node("10.0.0.2", alive=False)], HERE, None)
    assert cluster.spans_machines([node(HERE), node("10.0.0.2")], HERE, "10.0.0.1:6379")
    assert cluster.spans_machines([], HERE, "ray://head:10001")  # the driver would run on the head


@pytest.mark.parametrize("uri, local", [("sqlite:///mlflow.db", True), ("/abs/mlruns", True), ("mlruns", True),
                                        ("file:///abs/mlruns", True), ("http://head:5000", False),
                                        ("https://mlflow.example.com", False), ("databricks", False)])
def test_local_stores(uri: str, local: bool) -> None:
    assert cluster.is_local_store(uri) is local


def test_storage_folders() -> None:
    assert cluster.is_local_path("ray_results") and cluster.is_local_path("/abs/ray")
    assert not cluster.is_local_path("s3://bucket/ray") and not cluster.is_local_path("file:///nfs/ray")
    assert cluster.folder_of("file:///nfs/ray") == cluster.Path("/nfs/ray")
    assert cluster.folder_of("s3://bucket/ray") is None


def test_token_auth_is_enabled_for_an_explicit_address_with_a_token_at_hand(tmp_path, monkeypatch) -> None:
    token = tmp_path / "token"
    token.write_text("secret")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # Ray decides itself for a cluster it finds
    assert runtime.enable_token_auth() is None and "RAY_AUTH_MODE" not in runtime.os.environ
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6390")
    assert runtime.enable_token_auth() == str(token) and runtime.os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a user's explicit choice stays
    assert runtime.enable_token_auth() is None and runtime.os.environ["RAY_AUTH_MODE"] == "disabled"
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    assert runtime.enable_token_auth() is None and "RAY_AUTH_MODE" not in runtime.os.environ


def test_ray_client_addresses_stop_with_one_line_without_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "grpc", None)  # as without ray[client]: `import grpc` fails
    with pytest.raises(ConvForgeError, match=r"ray:// needs Ray Client .* RAY_ADDRESS=<head-ip>:6379"):
        cluster.join("ray://head:10001", log=lambda message: None)


# A Ray worker's SIGTERM handler (ray/_private/worker.py) raises SystemExit; the signal arrives while a weakref
# callback runs, as garbage collection in a trial does when Ray ends the worker.
SIGTERM_IN_A_CALLBACK = """
import os, signal, sys, weakref
from pipelines import cluster
def sigterm(signum, frame):
    raise SystemExit(1)
signal.signal(signal.SIGTERM, sigterm)
if sys.argv[1] == "quiet":
    cluster.quiet_sigterm_exit()
class Item: pass
def on_collect(ref):
    if sys.argv[2] == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(1000))  # the handler runs here
    else:
        raise ValueError("a real error in a callback")
item = Item(); ref = weakref.ref(item, on_collect); del item
print("went on")
"""


@pytest.mark.parametrize("hook", ["quiet", "python"])
@pytest.mark.parametrize("event", ["sigterm", "error"])
def test_a_worker_ended_by_sigterm_prints_no_traceback_and_other_errors_still_print(hook: str, event: str) -> None:
    done = subprocess.run([sys.executable, "-c", SIGTERM_IN_A_CALLBACK, hook, event], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "went on\n"  # Python cannot raise out of the callback
    printed = "Exception ignored" in done.stderr and "Traceback" in done.stderr
    assert printed == (hook == "python" or event == "error"), done.stderr


def test_the_worker_setup_hook_names_a_function_that_quiets_ray_restore_lines():
    import importlib
    import logging

    from pipelines import cluster

    module, _, name = cluster.WORKER_SETUP.rpartition(".")
    hook = getattr(importlib.import_module(module), name)  # how Ray resolves worker_process_setup_hook
    restore_logger = logging.getLogger("ray.tune.trainable.trainable")
    before = restore_logger.level
    try:
        restore_logger.setLevel(logging.INFO)
        hook()
        assert not restore_logger.isEnabledFor(logging.INFO) and restore_logger.isEnabledFor(logging.WARNING)
    finally:
        restore_logger.setLevel(before)


A_RAY_STAGE = """
import sys
import ray
from pipelines import cluster
from pipelines.errors import stage_entry

@ray.remote
def wait():
    import time
    time.sleep(120)

@stage_entry
def main():
    cluster.connect(num_cpus=1, log=lambda line: None)
    print("ready", flush=True)
    ray.get(wait.remote())
main()
"""


def descendants(pid: int) -> set[int]:
    """The live processes below `pid` (from /proc's parent links)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def test_a_sigterm_to_a_stage_on_ray_ends_it_like_ctrl_c() -> None:
    """Once Ray is joined, its core worker's SIGTERM handler printed a stack dump and aborted the stage (exit -6),
    leaving the search's MLflow run RUNNING; the stage's own handler is put back: one line, exit 143, Ray's
    processes gone."""
    import os
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    stage = subprocess.Popen([sys.executable, "-c", A_RAY_STAGE], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert stage.stdout.readline() == "ready\n", stage.stderr.read()
        started = descendants(stage.pid)
        assert started  # the local Ray's processes
        stage.send_signal(signal.SIGTERM)
        _, err = stage.communicate(timeout=60)
        assert stage.returncode == 143, err
        assert err.strip().splitlines()[-1] == "terminated (SIGTERM)"
        assert "SIGTERM received" not in err and "Traceback" not in err, err
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(scratch.running(pid) for pid in started):
            time.sleep(0.5)
        assert not [pid for pid in started if scratch.running(pid)], "Ray outlived the stage"
    finally:
        stage.kill()
