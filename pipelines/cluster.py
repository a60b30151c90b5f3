"""Joining Ray: a cluster started with `ray start` (by its GCS address, with its auth token), or a local Ray
of our own; and the one-line stop when a cluster of several machines would write to this machine's disk.

A driver joins a `ray start` cluster by the head's GCS address (`RAY_ADDRESS=<head>:6379`) from a node
of that cluster. Ray 2.60 turns token authentication on for a head started where a token exists (the
default file `~/.ray/auth_token`, `RAY_AUTH_TOKEN_PATH` or `RAY_AUTH_TOKEN`), but a driver given an
explicit address only sends one when `RAY_AUTH_MODE=token`, which Ray reads once, when imported:
`pipelines.runtime.enable_token_auth` (run as the stages import it, before the stack) sets it for RAY_ADDRESS
when a token is at hand, as Ray does for a cluster it finds on its own; a failure to join is one line
saying what to set. `ray://` (Ray Client) needs the `ray[client]` extra, which
ConvForge does not install.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlparse

from pipelines.errors import ConvForgeError, end_on_sigterm
from pipelines.runtime import token_source

if TYPE_CHECKING:
    from pipelines.params import SearchParams

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Generated trees a Ray cluster's workers never need (Ray also honours .gitignore).
UPLOAD_EXCLUDES = ["data/", "artifacts/", "reports/", "ray_results/", "mlruns/", "mlartifacts/", "*.db",
                   ".venv/", ".dvc/cache/", "bench/results/", "bentos/"]
AUTH_HELP = ("give this process the cluster's token: RAY_AUTH_MODE=token with RAY_AUTH_TOKEN=<`ray get-auth-token` "
             "on the head> (or RAY_AUTH_TOKEN_PATH=<file>)")


def quiet_sigterm_exit() -> None:
    """In a Ray worker process: no traceback when Ray ends it. Ray stops a finished search's or training's workers
    with SIGTERM, whose handler raises SystemExit wherever the process is; when that is inside a garbage-collection
    callback, Python cannot raise it and prints "Exception ignored in ..." with its traceback to the terminal
    instead, under a search that succeeded. The process ends either way; only that print goes."""
    sys.unraisablehook = _unraisable


def quiet_worker() -> None:
    """Ray's worker_process_setup_hook: Ray's INFO line "Restored on <ip> from checkpoint: Checkpoint(...)", logged
    before the trial's own code runs, each time a paused, retried or resumed trial goes on, stays out of the
    terminal (the search prints its own line per trial result)."""
    import logging

    logging.getLogger("ray.tune.trainable.trainable").setLevel(logging.WARNING)


WORKER_SETUP = f"{__name__}.quiet_worker"


def _unraisable(unraisable: Any) -> None:
    if not issubclass(unraisable.exc_type, SystemExit):
        sys.__unraisablehook__(unraisable)


def join(address: str, log: Callable[[str], None] = print) -> None:
    """Connect this process to the Ray cluster at `address` (the project travels as the job's working_dir);
    a failure is one line saying what to set."""
    import ray

    if address.startswith("ray://"):
        try:
            import grpc  # noqa: F401  (what the ray[client] extra adds)
        except ImportError:
            raise ConvForgeError(f"RAY_ADDRESS {address}: ray:// needs Ray Client (pip install 'ray[client]==2.60.0'); "
                                 "or run the stage on a node of the cluster with RAY_ADDRESS=<head-ip>:6379, the "
                                 "address `ray start --head` printed") from None
    token = os.environ.get("RAY_AUTH_MODE") == "token"
    log(f"connecting to the Ray cluster at {address}" + (f" (auth token from {token_source()})" if token else ""))
    try:
        ray.init(address=address, log_to_driver=True,
                 runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": UPLOAD_EXCLUDES,
                              "worker_process_setup_hook": WORKER_SETUP})
    except ConnectionError as exc:
        raise ConvForgeError(f"cannot join the Ray cluster at {address} ({exc}): check that `ray status --address "
                             f"{address}` answers there; if the head uses token authentication, {AUTH_HELP}") from None
    except RuntimeError as exc:
        if "token" not in str(exc).lower():
            raise
        raise ConvForgeError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}; {AUTH_HELP}"
                             ) from None


def start_local(num_cpus: int | None = None, log: Callable[[str], None] = print) -> None:
    """A new Ray of our own on this machine (never one that another process left running here)."""
    import ray

    num_cpus = num_cpus or len(os.sched_getaffinity(0))
    pythonpath = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    log(f"starting a local Ray with {num_cpus} CPU(s)")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
             object_store_memory=512 * 2**20,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}, "worker_process_setup_hook": WORKER_SETUP})


def connect(address: str | None = None, num_cpus: int | None = None, log: Callable[[str], None] = print) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray; False when already connected."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        join(address, log)
    else:
        start_local(num_cpus, log)
    end_on_sigterm()  # ray.init's core worker replaced the stage's SIGTERM handler with an abort
    return True


def trial_resources(search: "SearchParams") -> tuple[float, float]:
    """(CPUs, GPUs) per search trial: search.cpus_per_trial and gpus_per_trial, `auto` resolved on the machines the
    trials run on: this one, or the Ray cluster the search joins (search.ray_address or RAY_ADDRESS; joined here,
    as the search would). On a cluster `auto` shares its live nodes' CPUs and GPUs between max_concurrent trials,
    a trial's CPUs within one node: a head node without GPUs (or with fewer cores) no longer decides."""
    from pipelines import runtime

    address = search.ray_address or os.environ.get("RAY_ADDRESS")
    hw = runtime.probe()
    if "auto" not in (search.cpus_per_trial, search.gpus_per_trial) or not address or address == "local":
        return runtime.trial_resources(search.cpus_per_trial, search.gpus_per_trial, search.max_concurrent, hw)
    import ray

    connect(address)
    nodes, node_cpus = runtime.cluster_hardware(ray.nodes())
    cpus, gpus = runtime.trial_resources(search.cpus_per_trial, search.gpus_per_trial, search.max_concurrent, nodes)
    return (min(cpus, node_cpus) if search.cpus_per_trial == "auto" else cpus), gpus


def spans_machines(nodes: list[dict[str, Any]], here: str, address: str | None) -> bool:
    """Whether a Ray reaches beyond the machine at IP `here`: through Ray Client (the driver runs on the head), or
    with a live node at another address (`nodes` as `ray.nodes()` lists them); their processes cannot see this
    machine's files."""
    if (address or "").startswith("ray://"):
        return True
    return any(node.get("Alive") and node.get("NodeManagerAddress") != here for node in nodes)


def is_local_store(uri: str) -> bool:
    """An MLflow store on this machine's disk (SQLite, a file store), not a tracking server."""
    if uri.startswith("databricks"):
        return False
    scheme = urlparse(uri).scheme
    return scheme in ("", "file", "sqlite") or len(scheme) == 1  # one letter: a Windows drive


def is_local_path(storage: str) -> bool:
    """A plain folder (no URI scheme): on a cluster, each node would write its own copy."""
    return "://" not in storage


def folder_of(storage: str) -> Path | None:
    """The folder a plain path or a file:// URI names (None for remote storage)."""
    if is_local_path(storage):
        return Path(storage)
    parsed = urlparse(storage)
    return Path(parsed.path) if parsed.scheme == "file" else None


def require_shared(what: str, tracking_uri: str, storage: str | None, address: str | None = None) -> None:
    """Stop with one line when the connected Ray spans machines but MLflow or Ray's storage is this machine's disk."""
    local = [f"MLflow store {tracking_uri} (set MLFLOW_TRACKING_URI to a tracking server, e.g. "
             f"http://<head>:5000 from `mlflow server`)"] if is_local_store(tracking_uri) else []
    if storage is not None and is_local_path(storage):
        local.append(f"storage {storage} (set search.storage to a URI every node reaches: s3://..., gs://..., "
                     f"or file:///<path> on a shared filesystem)")
    if not local:
        return
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if spans_machines(ray.nodes(), ray.util.get_node_ip_address(), address):
        raise ConvForgeError(f"{what}: the Ray cluster spans several machines, but " + " and ".join(local))
