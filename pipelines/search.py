"""The search of one task: Ray Tune trials over its families, tracked in MLflow, then the winner.

`run_search` trains `search.<task>.num_samples` trials on `train_subset` training items for at most
`max_epochs` epochs each, logs one MLflow parent run with every trial as a child run, and writes
`best.json` (the winner, read by the train stage), `families.json`/`families.csv` (each family's
best trial with its size and CPU latency) and `score_vs_latency.png` (all trials, Pareto front marked).
An interrupted search resumes where it stopped when it is run again with the same inputs and code; changed code
(`models/`, `pipelines/`) is a new search.

With `search.budget: epochs` the search is reproducible: the same params, seed, code and thread count give
the same trials, scores and winner on any machine with the same kind of CPU (pipelines/tuner.py says how),
unless its time guard fires or `max_latency_ms` (latencies measured on this machine) picks the winner, which
best.json and families.json then say (`reproducible: false`). The parent run's `search_inputs.json` and each child
run's `trial.json` are what `python -m pipelines.replay` rebuilds a trial from.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import pipelines.runtime as runtime
from models import _checkpoint as checkpoint
from models.summary import profile
from pipelines import cluster, tracking
from pipelines.engine import EngineSettings, computing
from pipelines.errors import ConvForgeError
from pipelines.geometry import data_geometry
from pipelines.params import Params, SearchParams, TaskSearchParams, TrainConfig
from pipelines.recipe import run_model
from pipelines.search_progress import SearchProgress
from pipelines.search_space import SearchSpace
from pipelines.tasks import PRIMARY, get_task
from pipelines.tracking.search_runs import log_search_inputs
from pipelines.tracking.trial_logger import TrialLogger
from pipelines.transfer import TORCHVISION, pretrained_source
from pipelines.tuner import (PAUSING, Experiment, TrialData, TrialRecord, is_saved, rungs, run_trials, train_trial,
                             trial_base, trial_records)

# The search keys that shape the trials; ray_address, storage and max_latency_ms only say where trials
# run and which finished trial wins, so changing them reuses a finished search.
SHAPING_KEYS = ("budget", "scheduler", "algorithm", "reduction_factor", "cpus_per_trial", "gpus_per_trial",
                "max_concurrent", "max_failures")
OUTPUTS = ("best.json", "families.json", "families.csv", "score_vs_latency.png")
TABLE_COLUMNS = ("family", "score", "params", "macs", "latency_ms", "trials", "errors")


def trial_config(params: Params, task: str) -> TrainConfig:
    """The training config trials start from: `train.<task>` with `search.<task>.max_epochs` for its epochs
    (`train.<task>.epochs` is the final training's alone: changing it reruns no search)."""
    return trial_base(params.train.task(task), params.search.task(task).max_epochs)


def pretrained_sources(params: Params, task: str, space: SearchSpace) -> dict[str, str]:
    """Each `pretrained` a trial may use (train.<task>'s and the searched choices) resolved to its weights:
    missing ones fail here, in one line, before any trial starts."""
    choice = space.train.get("pretrained")
    specs = {trial_config(params, task).pretrained, *(choice.values if choice is not None else ())}
    return {spec: pretrained_source(spec, task) for spec in specs if spec}


def weights_of(sources: dict[str, str]) -> dict[str, str | None]:
    """What identifies each pretrained source's weights: a saved model's hash, or the torchvision name."""
    return {spec: source if source.startswith(TORCHVISION) else checkpoint.read_config(Path(source)).get(
        "weights_sha256") for spec, source in sources.items()}


def search_key(params: Params, task: str, space: SearchSpace, data_hash: str,
               pretrained: dict[str, str] | None = None, code: str | None = None) -> str:
    """A short hash of everything that shapes the trials: same key, same search (resumable). A retrained
    pretrained model is another search, and so is changed code (`code`: default, `tracking.code_hash()`):
    finished trials are only reused by the code that ran them."""
    inputs = {"task": task, "seed": params.seed, "deterministic": params.deterministic,
              "code": code or tracking.code_hash(),
              "search": {key: getattr(params.search, key) for key in SHAPING_KEYS},
              "budget": params.search.task(task).model_dump(), "train": trial_config(params, task).model_dump(),
              "policy": params.augment.policy.model_dump(), "space": repr(space), "data": data_hash,
              "engine": computing(recorded_engine(params)),
              **({"pretrained": weights_of(pretrained)} if pretrained else {}),
              # what an adapter makes of the prepared data (reconstruct: the corruption), when params choose it
              **({"made": get_task(task).made_by(params)} if hasattr(get_task(task), "made_by") else {})}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prepare_search(params: Params, task: str, data_root: Path, storage: str | None,
                   space: SearchSpace | None) -> tuple[Experiment, str, str]:
    """The task's experiment (space, data, trial config, Ray storage), its data hash and its search key."""
    budget, adapter = params.search.task(task), get_task(task)
    space = space or SearchSpace.build(task, budget.families, budget.space, budget.model_space)
    train = adapter.load_split(data_root, "train").subset(budget.train_subset, params.seed)
    val = adapter.load_split(data_root, "val")
    data_hash = tracking.data_hash(data_root)
    pretrained = pretrained_sources(params, task, space)
    key = search_key(params, task, space, data_hash, pretrained)
    # ./ray_results of the main workspace, also from a `dvc exp run --temp` copy (its results outlive the copy)
    storage = storage or params.search.storage or str(tracking.workspace_root(Path.cwd()) / "ray_results")
    data = TrialData(str(data_root.resolve()), budget.train_subset, params.seed, data_geometry(train), pretrained)
    search = params.search
    # budget epochs: trials drawn in order, each from the trials `window` or more places before it; sha decides
    # each rung on all of them, so it draws every trial up front
    window = None if search.budget != "epochs" else budget.num_samples if search.scheduler == "sha" else (
        search.max_concurrent)
    experiment = Experiment(task, PRIMARY[task], space, budget, trial_config(params, task), train, val, storage,
                            f"search-{task}-{key}", data, window, search.reduction_factor, search.scheduler)
    return experiment, data_hash, key


def trial_resources(params: Params) -> tuple[float, float]:
    """(CPUs, GPUs) per trial: search.cpus_per_trial and gpus_per_trial, `auto` resolved on this machine or the
    Ray cluster the search joins (`pipelines.cluster.trial_resources`)."""
    return cluster.trial_resources(params.search)


def gpus_elsewhere(gpus: float) -> bool:
    """Whether the trials get GPUs this machine lacks (a cluster's, from a head node without one): this process
    cannot resolve their device, each trial resolves its own."""
    return gpus > 0 and runtime.probe().gpus == 0


def trial_device(params: Params) -> tuple[str, str]:
    """(device, the line that says how) of the trials, as MLflow records them and the search logs them."""
    gpus = trial_resources(params)[1]
    if gpus_elsewhere(gpus):
        return "cuda", "cuda, the Ray cluster's GPUs (each trial resolves its AMP and says it in its run)"
    choice = trial_settings(params).choice()
    return choice.device, runtime.device_line(choice, runtime.probe()).removeprefix("device: ")


def trial_determinism(params: Params) -> str:
    """The trials' deterministic mode (runtime.DeviceChoice.deterministic), on a cluster's GPUs as well."""
    if gpus_elsewhere(trial_resources(params)[1]):
        return "cudnn" if params.deterministic else "off"
    return trial_settings(params).choice().deterministic


def trial_settings(params: Params) -> EngineSettings:
    """How each trial runs its engine: on its own CPUs (train.num_threads would count every core)."""
    cpus, gpus = trial_resources(params)
    device = params.train.device
    if gpus == 0 and device == "cuda":
        raise ConvForgeError("train.device is cuda but search.gpus_per_trial is 0: trials would see no GPU "
                             "(set search.gpus_per_trial to auto or a fraction such as 0.25)")
    # Ray hides every GPU from a trial that asked for none: say cpu rather than let `auto` find none.
    update = {"num_threads": max(1, int(cpus)), **({"device": "cpu"} if gpus == 0 else {})}
    return EngineSettings.from_params(params.model_copy(update={"train": params.train.model_copy(update=update)}),
                                      concurrent_runs=params.search.max_concurrent)


def trial_inputs(params: Params, task: str) -> dict[str, Any]:
    """What each trial of `task`'s search trains from, as `pipelines.replay.trial_scores` reads it: the seed, the
    train subset, the epochs, the training config its choice is applied to and the augmentation policy."""
    budget = params.search.task(task)
    return {"seed": params.seed, "train_subset": budget.train_subset, "max_epochs": budget.max_epochs,
            "base": trial_config(params, task).model_dump(), "policy": params.augment.policy.model_dump()}


def search_inputs(params: Params, experiment: Experiment, data_hash: str) -> dict[str, Any]:
    """What every trial of the search shares, as a replay of one of them needs it."""
    cpus, gpus = trial_resources(params)
    return {"task": experiment.task, "metric": experiment.metric, "budget": params.search.budget,
            "data_hash": data_hash, "git_commit": tracking.git_commit(), **trial_inputs(params, experiment.task),
            "engine": recorded_engine(params), "cpus_per_trial": cpus, "gpus_per_trial": gpus}


def recorded_engine(params: Params) -> dict[str, Any]:
    """The trials' engine settings as a replay reads them: resolved here, or (GPUs this machine lacks) as given,
    device cuda."""
    settings = trial_settings(params)
    if gpus_elsewhere(trial_resources(params)[1]):
        return {**asdict(settings), "device": "cuda"}
    return settings.recorded()


def search_trials(params: Params, experiment: Experiment, data_hash: str, key: str, log: Callable[[str], None],
                  trial: Callable[..., None] = train_trial) -> tuple[str, str]:
    """Run (or resume) the trials under their MLflow parent run; returns the experiment's and the run's ids."""
    uri = tracking.configure(params.mlflow)
    experiment_id = tracking.ensure_experiment(params.mlflow.experiment)
    task = experiment.task
    values = {"task": task, "budget": params.search.budget, "scheduler": params.search.scheduler,
              "algorithm": params.search.algorithm, "seed": params.seed, "data_hash": data_hash,
              **experiment.budget.model_dump()}
    (cpus, gpus), (device, how) = trial_resources(params), trial_device(params)
    log(f"search {task}: each trial gets {cpus:g} CPU(s), {gpus:g} GPU(s); device: {how}")
    values.update(cpus_per_trial=cpus, gpus_per_trial=gpus, device=device)
    parent_id, complete = tracking.open_search(experiment_id, task, key, values)
    if complete and is_saved(experiment):
        # It ended by its trial count or time budget: a rerun (e.g. for another max_latency_ms) re-reads it.
        log(f"search {task}: already complete; reading its trials back")
        return experiment_id, parent_id
    log_search_inputs(parent_id, search_inputs(params, experiment, data_hash))
    logger = TrialLogger(uri, experiment_id, parent_id, experiment.space, experiment.metric,
                         experiment.budget.max_epochs)
    budget = experiment.budget
    pausing = experiment.scheduler in PAUSING
    pauses_at = rungs(budget.max_epochs, budget.grace_period, experiment.reduction_factor) if pausing else []
    progress = SearchProgress(task, experiment.metric, budget.max_epochs, budget.num_samples, log, pauses_at)
    try:
        run_trials(experiment, params.search, params.seed, trial_settings(params), params.augment.policy,
                   [logger, progress], log, trial)
    except Exception:
        tracking.end_search(parent_id, "FAILED")
        raise
    except KeyboardInterrupt:  # the state saved at the last epoch stays: a rerun resumes from it
        tracking.end_open_trials(parent_id)
        tracking.end_search(parent_id, "KILLED")
        raise
    tracking.mark_complete(parent_id)
    return experiment_id, parent_id


def guard_fired(budget: TaskSearchParams, records: list[TrialRecord]) -> str | None:
    """budget epochs: how the time guard cut the search short (trials never drawn, trials stopped by the clock),
    which makes its outcome depend on the machine; None when it did not fire."""
    cut = sum(record.status == "timed_out" for record in records)
    missing = budget.num_samples - len(records)
    if not cut and missing <= 0:
        return None
    return (f"the time guard (time_budget_s = {budget.time_budget_s:g} s) fired: {max(0, missing)} trial(s) never "
            f"drawn, {cut} stopped; the search is not reproducible (raise the guard or lower the budget)")


def is_reproducible(search: SearchParams, fired: str | None, deterministic: str) -> bool:
    """Whether the same params, code and data give the same trials, scores and winner on the same kind of machine:
    trials budgeted in epochs, the time guard silent, the winner not picked by latencies measured on this machine
    (max_latency_ms), and trials on the CPU's deterministic kernels (`deterministic`: the trials' mode, as
    `trial_determinism` gives it). On CUDA only cuDNN's convolutions are deterministic (other backward kernels add
    with atomics: max-pool with overlapping windows, bilinear upsampling, RoIAlign), so trial scores vary."""
    return search.budget == "epochs" and not fired and search.max_latency_ms is None and deterministic == "kernels"


def run_search(params: Params, task: str, data_root: Path, out_dir: Path, *, storage: str | None = None,
               space: SearchSpace | None = None, log: Callable[[str], None] = print,
               trial: Callable[..., None] = train_trial) -> dict[str, Any]:
    """Run (or resume) the search for `task`, log it to MLflow, write `out_dir`; returns best.json's content.
    `trial` is the trainable (`pipelines.tuner.train_trial`; a test may wrap it)."""
    started = time.monotonic()
    experiment, data_hash, key = prepare_search(params, task, Path(data_root), storage, space)
    budget = experiment.budget
    log(f"search {task}: {len(experiment.space.families)} families, {budget.num_samples} trials x "
        f"<= {budget.max_epochs} epochs on {len(experiment.train)} items; experiment {experiment.path}")
    experiment_id, parent_id = search_trials(params, experiment, data_hash, key, log, trial)

    records = trial_records(experiment)
    tracking.close_trial_runs(experiment_id, parent_id, {r.trial_id: {"status": r.status, "score": r.score,
                                                                       "epochs": r.epochs} for r in records})
    fired = guard_fired(budget, records) if params.search.budget == "epochs" else None
    if fired:
        log(f"search {task}: warning: {fired}")
    reproducible = is_reproducible(params.search, fired, trial_determinism(params))
    log(f"search {task}: {len(records)} trials done; profiling their models")
    rows = trial_rows(records, profile_trials(task, records, experiment.train, experiment.data.geometry,
                                              trunks(records, experiment)))
    table = families_table(list(experiment.space.families), rows)
    try:
        winner = pick_winner(rows, params.search.max_latency_ms)
    except ConvForgeError:
        tracking.end_search(parent_id, "FAILED")
        raise
    best = {
        "task": task, "family": winner["family"], "model": winner["hparams"], "train": winner["train"],
        "metric": experiment.metric, "score": winner["score"], "trial_id": winner["trial_id"],
        "mlflow_parent_run_id": parent_id,
        "mlflow_run_id": tracking.trial_run(experiment_id, parent_id, winner["trial_id"]),
        "families": [{k: row[k] for k in ("family", "score", "params", "macs", "latency_ms")} for row in table],
        "reproducible": reproducible,
    }
    write_search(out_dir, best, table, rows, winner, parent_id, time.monotonic() - started)
    log(format_table(table, experiment.metric))
    log(f"search {task}: winner {best['family']} {experiment.metric}={best['score']:.4f} "
        f"(trial {best['trial_id']}) in {time.monotonic() - started:.0f} s; wrote {out_dir}")
    return best


def write_search(out_dir: Path, best: dict[str, Any], table: list[dict[str, Any]], rows: list[dict[str, Any]],
                 winner: dict[str, Any], parent_id: str, elapsed: float) -> None:
    """The search's files into `out_dir`, and the same files, table and totals into its parent run."""
    metric = best["metric"]
    with runtime.atomic_dir(out_dir) as staging:
        runtime.write_json(staging / "best.json", best)
        runtime.write_json(staging / "families.json", {"task": best["task"], "metric": metric, "families": table,
                                                       "trials": rows, "reproducible": best["reproducible"]})
        write_csv(staging / "families.csv", table)
        plot_score_vs_latency(rows, winner, metric, staging / "score_vs_latency.png")
        totals = {"best_score": best["score"], "trials": len(rows),
                  "trials_errored": sum(row["status"] == "error" for row in rows),
                  "trial_epochs": sum(row["epochs"] for row in rows), "search_time_s": elapsed,
                  "reproducible": float(best["reproducible"])}
        tracking.log_search_result(parent_id, [staging / name for name in OUTPUTS],
                                   {key: [row[key] for row in table] for key in TABLE_COLUMNS}, totals,
                                   {"family": best["family"], "trial_id": best["trial_id"],
                                    "run_id": best["mlflow_run_id"]})


def trunks(records: list[TrialRecord], experiment: Experiment) -> dict[str, str | None]:
    """Each trial's resolved `pretrained` source by trial id: its own draw, else the search's base config's."""
    sources = experiment.data.pretrained if experiment.data is not None else {}
    return {r.trial_id: sources.get(r.train.get("pretrained", experiment.base.pretrained)) for r in records}


def profile_trials(task: str, records: list[TrialRecord], data: Any, geometry: dict[str, Any] | None = None,
                   pretrained: dict[str, str | None] | None = None) -> dict[str, dict[str, Any]]:
    """Size, MACs and CPU latency (1 thread) of each scored trial's model, built as the trial built it (with the
    data's detector geometry and the trunk of its `pretrained` source, by trial id), by trial id."""
    import torch

    # One thread: per-request serving latency, and stable figures on a busy machine (two threads
    # that wait on each other under load read many times slower: BENCHMARKS.md). The process's own count
    # comes back after: what runs next in it (a final training) has its cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for record in records:
            if record.score is None:
                continue
            _, model, _ = run_model(task, record.family, record.hparams, data, 0, geometry or {},
                                    (pretrained or {}).get(record.trial_id))
            out[record.trial_id] = profile(model, task, data.in_channels, data.image_size, reps=5)
    finally:
        torch.set_num_threads(threads)
    return out


def trial_rows(records: list[TrialRecord], profiles: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per trial: its choice, outcome and (when scored) size and latency."""
    rows = []
    for record in records:
        prof = profiles.get(record.trial_id, {})
        rows.append({**asdict(record), "params": prof.get("params"), "macs": prof.get("macs"),
                     "latency_ms": prof.get("latency_ms_1"), "latency_ms_64": prof.get("latency_ms_64")})
    return rows


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, score) points no other point beats on both (lower latency, higher score)."""
    front = []
    for i, (lat, score) in enumerate(points):
        dominated = any(l2 <= lat and s2 >= score and (l2 < lat or s2 > score)
                        for j, (l2, s2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def pick_winner(rows: list[dict[str, Any]], max_latency_ms: float | None) -> dict[str, Any]:
    """The best-scoring trial, among those within `max_latency_ms` (1 image, CPU) when it is set; a tie goes to
    the fewer MACs, then the earlier trial (never to a latency measured on this machine)."""
    scored = [row for row in rows if row["score"] is not None]
    if not scored:
        raise ConvForgeError("every search trial failed (see the trials' errors in MLflow and above)")
    allowed = [row for row in scored if max_latency_ms is None or row["latency_ms"] <= max_latency_ms]
    if not allowed:
        fastest = min(row["latency_ms"] for row in scored)
        raise ConvForgeError(f"search.max_latency_ms: no trial is within {max_latency_ms} ms "
                             f"(the fastest takes {fastest:.3g} ms)")
    return min(allowed, key=lambda row: (-row["score"], row.get("macs") or 0, row.get("index", 0)))


def families_table(families: list[str], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each family's best trial (score, parameter count, MACs, latency), best family first."""
    table = []
    for name in families:
        mine = [row for row in rows if row["family"] == name]
        scored = [row for row in mine if row["score"] is not None]
        best = max(scored, key=lambda row: row["score"]) if scored else None
        table.append({
            "family": name, "score": best and best["score"], "params": best and best["params"],
            "macs": best and best["macs"], "latency_ms": best and best["latency_ms"],
            "hparams": best["hparams"] if best else None, "trial_id": best and best["trial_id"],
            "trials": len(mine), "errors": sum(row["status"] == "error" for row in mine),
        })
    return sorted(table, key=lambda row: (row["score"] is None, -(row["score"] or 0.0)))


def plot_score_vs_latency(rows: list[dict[str, Any]], winner: dict[str, Any], metric: str, path: Path) -> None:
    """Scatter of every scored trial's latency vs score, by family, with the Pareto front and the winner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [row for row in rows if row["score"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name in sorted({row["family"] for row in scored}):
        mine = [row for row in scored if row["family"] == name]
        ax.scatter([r["latency_ms"] for r in mine], [r["score"] for r in mine], label=name, alpha=0.8)
    points = [(row["latency_ms"], row["score"]) for row in scored]
    front = pareto_front(points)
    ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color="black",
            linewidth=1, label="Pareto front")
    ax.scatter([winner["latency_ms"]], [winner["score"]], marker="*", s=250, color="gold", edgecolor="black",
               zorder=5, label="winner")
    ax.set_xscale("log")
    ax.set_xlabel("CPU latency, 1 image, 1 thread (ms)")
    ax.set_ylabel(metric)
    ax.set_title("search trials: score vs latency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """The families table as CSV, hparams as JSON."""
    columns = [*TABLE_COLUMNS, "trial_id", "hparams"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**row, "hparams": json.dumps(row["hparams"], sort_keys=True)} for row in rows)


def format_table(table: list[dict[str, Any]], metric: str) -> str:
    """The families table as aligned text."""
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"{'family':<16}{metric:>14}{'params':>12}{'MMACs':>10}{'ms/img':>9}{'trials':>8}{'errors':>8}"]
    for row in table:
        macs = None if row["macs"] is None else row["macs"] / 1e6
        lines.append(f"{row['family']:<16}{fmt(row['score'], '.4f'):>14}{fmt(row['params'], ','):>12}"
                     f"{fmt(macs, '.2f'):>10}{fmt(row['latency_ms'], '.2f'):>9}{row['trials']:>8}{row['errors']:>8}")
    return "\n".join(lines)
