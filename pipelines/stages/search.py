"""Stage `search@task`: a Ray Tune search over the task's families, tracked in MLflow.

`python -m pipelines.stages.search classify|detect|segment` trains `search.<task>.num_samples` trials
on `train_subset` training items for at most `max_epochs` epochs each, logs one MLflow parent
run with every trial as a child run, and writes `artifacts/search/<task>/`: `best.json` (the
winner, read by `train@task`), `families.json`/`families.csv` (each family's best trial with its
size and CPU latency) and `score_vs_latency.png` (all trials, Pareto front marked).
An interrupted search resumes where it stopped when the stage is rerun with the same inputs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import pipelines.runtime as runtime  # first: telemetry off before the stack is imported
from pipelines.errors import ConvForgeError, stage_entry
from pipelines.params import TASKS, Params, load_params
from pipelines.tuning import (METRICS, PARENT_TAG, TRIAL_TAG, MlflowTrialLogger, SearchSpace, TrialRecord,
                              experiment_path, find_child_run, init_ray, make_tuner, train_trial, trial_records)

DATA = {"classify": "classify", "detect": "scenes", "segment": "scenes"}
SEARCH_TAG = "convforge.search_key"
STATE_TAG = "convforge.search_state"


def search_key(params: Params, task: str, space: SearchSpace, data_hash: str) -> str:
    """A short hash of everything that shapes the trials: same key, same search (resumable)."""
    search = params.search.model_dump(exclude={"max_latency_ms", "ray_address", "storage",
                                               *(t for t in TASKS if t != task)})
    inputs = {"task": task, "seed": params.seed, "deterministic": params.deterministic, "search": search,
              "train": params.train.task(task).model_dump(), "policy": params.augment.policy.model_dump(),
              "space": repr(space), "data": data_hash}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_split(task: str, root: Path, split: str) -> Any:
    from pipelines.datasets import load_classify, load_scenes

    return (load_classify if task == "classify" else load_scenes)(root, split)


def parent_run(client: Any, experiment_id: str, task: str, key: str, params: Params,
               data_hash: str) -> tuple[str, bool]:
    """The search's MLflow parent run (the one an earlier attempt of this search opened, else a new one),
    and whether that search already completed."""
    from mlflow.entities import Param

    from pipelines.tracking import flatten

    found = client.search_runs([experiment_id], filter_string=f"tags.`{SEARCH_TAG}` = '{key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, found[0].data.tags.get(STATE_TAG) == "complete"
    run = client.create_run(experiment_id, run_name=f"search-{task}",
                            tags={SEARCH_TAG: key, "convforge.task": task, "convforge.stage": "search"})
    task_search = params.search.task(task)
    values = flatten({"task": task, "scheduler": params.search.scheduler, "algorithm": params.search.algorithm,
                      "seed": params.seed, "data_hash": data_hash, **task_search.model_dump()})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in values.items()])
    return run.info.run_id, False


def close_child_runs(client: Any, experiment_id: str, parent_id: str, records: list[TrialRecord]) -> None:
    """End the child runs still open: trials the time budget stopped, and trials a killed driver
    had started after Tune last saved its state (the resumed search drew them anew: `lost`)."""
    states = {record.trial_id: record.status for record in records}
    open_runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' "
                                                                  "and attributes.status = 'RUNNING'")
    for run in open_runs:
        state = states.get(run.data.tags.get(TRIAL_TAG), "lost")
        client.set_tag(run.info.run_id, "convforge.trial_state", state)
        client.set_terminated(run.info.run_id, "FINISHED" if state in ("completed", "stopped") else "KILLED")


def profile_trials(task: str, records: list[TrialRecord], data: Any) -> dict[str, dict[str, Any]]:
    """Size, MACs and CPU latency (1 thread) of each scored trial's model, by trial id."""
    import torch

    from models._registry import build
    from models.summary import profile

    # One thread: per-request serving latency, and stable figures on a busy machine (two threads
    # that wait on each other under load read 10-100x slower).
    torch.set_num_threads(1)
    out = {}
    for record in records:
        if record.score is None:
            continue
        model = build(task, record.family, len(data.classes), data.in_channels, data.image_size, **record.hparams)
        out[record.trial_id] = profile(model, task, data.in_channels, data.image_size, reps=5)
    return out


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
    """The best-scoring trial, among those within `max_latency_ms` (1 image, CPU) when it is set."""
    scored = [row for row in rows if row["score"] is not None]
    if not scored:
        raise ConvForgeError("every search trial failed (see the trials' errors in MLflow and above)")
    allowed = [row for row in scored if max_latency_ms is None or row["latency_ms"] <= max_latency_ms]
    if not allowed:
        fastest = min(row["latency_ms"] for row in scored)
        raise ConvForgeError(f"search.max_latency_ms: no trial is within {max_latency_ms} ms "
                             f"(the fastest takes {fastest:.3g} ms)")
    return max(allowed, key=lambda row: (row["score"], -row["latency_ms"]))


def trial_rows(records: list[TrialRecord], profiles: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per trial: its choice, outcome and (when scored) size and latency."""
    rows = []
    for record in records:
        prof = profiles.get(record.trial_id, {})
        rows.append({**asdict(record), "params": prof.get("params"), "macs": prof.get("macs"),
                     "latency_ms": prof.get("latency_ms_1"), "latency_ms_64": prof.get("latency_ms_64")})
    return rows


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
    columns = ["family", "score", "params", "macs", "latency_ms", "trials", "errors", "trial_id", "hparams"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**row, "hparams": json.dumps(row["hparams"], sort_keys=True)} for row in rows)


def tune_trials(params: Params, task: str, space: SearchSpace, train_data: Any, val_data: Any, storage: str,
                name: str, logger: MlflowTrialLogger, log: Callable[[str], None] = print) -> None:
    """Fit the Tuner (new, or restored from storage/name); trials log to MLflow through `logger` in this process."""
    import ray
    from ray import tune

    from pipelines.engine import EngineSettings

    task_search, base = params.search.task(task), params.train.task(task)
    # Each trial runs its engine on its own CPUs (train.num_threads would count every core).
    threads = max(1, int(params.search.cpus_per_trial))
    settings = EngineSettings.from_params(params.model_copy(
        update={"train": params.train.model_copy(update={"num_threads": threads})}))
    started_ray = init_ray(params.search.ray_address, log=log)
    # The data go to Ray's object store once; every trial reads them from there.
    trainable = tune.with_parameters(train_trial, task=task, space=space, train_data=train_data, val_data=val_data,
                                     base=base, settings=settings, policy=params.augment.policy,
                                     max_epochs=task_search.max_epochs)
    tuner = make_tuner(trainable, space, task=task, search=params.search, task_search=task_search, base=base,
                       seed=params.seed, storage=storage, name=name, callbacks=[logger], log=log)
    try:
        tuner.fit()
    except Exception:
        logger.client.set_terminated(logger.parent_run_id, "FAILED")
        raise
    except KeyboardInterrupt:  # the state saved at the last epoch stays: a rerun resumes from it
        logger.client.set_terminated(logger.parent_run_id, "KILLED")
        raise
    else:
        logger.client.set_tag(logger.parent_run_id, STATE_TAG, "complete")
    finally:
        if started_ray:  # free the cores before profiling
            ray.shutdown()


def run_search(params: Params, task: str, data_root: Path, out_dir: Path, *, storage: str | None = None,
               space: SearchSpace | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the search for `task`, log it to MLflow, write `out_dir`; returns best.json's content."""
    from mlflow import MlflowClient
    from ray import tune

    from pipelines import tracking

    if task not in TASKS:
        raise ConvForgeError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
    started = time.monotonic()
    task_search, metric = params.search.task(task), METRICS[task]
    space = space or SearchSpace.build(task, task_search.families, task_search.space, task_search.model_space)
    train_data = load_split(task, data_root, "train").subset(task_search.train_subset, params.seed)
    val_data = load_split(task, data_root, "val")
    data_hash = tracking.data_hash(Path(data_root))
    key = search_key(params, task, space, data_hash)
    storage = storage or params.search.storage or str(Path("ray_results").resolve())
    name = f"search-{task}-{key}"
    log(f"search {task}: {len(space.families)} families, {task_search.num_samples} trials x "
        f"<= {task_search.max_epochs} epochs on {len(train_data)} items; experiment {experiment_path(storage, name)}")

    tracking_uri = tracking.configure(params.mlflow)
    experiment_id = tracking.ensure_experiment(params.mlflow.experiment)
    client = MlflowClient(tracking_uri)
    parent_id, complete = parent_run(client, experiment_id, task, key, params, data_hash)
    if complete and tune.Tuner.can_restore(experiment_path(storage, name)):
        # It ended by its trial count or time budget: a rerun (e.g. for another max_latency_ms) re-reads it.
        log(f"search {task}: already complete; reading its trials back")
    else:
        tune_trials(params, task, space, train_data, val_data, storage, name,
                    MlflowTrialLogger(tracking_uri, experiment_id, parent_id, space, metric, task_search.max_epochs),
                    log)

    records = trial_records(experiment_path(storage, name), space, metric, task_search.max_epochs)
    close_child_runs(client, experiment_id, parent_id, records)
    log(f"search {task}: {len(records)} trials done; profiling their models")
    rows = trial_rows(records, profile_trials(task, records, train_data))
    table = families_table(list(space.families), rows)
    try:
        winner_row = pick_winner(rows, params.search.max_latency_ms)
    except ConvForgeError:
        client.set_terminated(parent_id, "FAILED")
        raise
    best = {
        "task": task, "family": winner_row["family"], "model": winner_row["hparams"],
        "train": winner_row["train"], "metric": metric, "score": winner_row["score"],
        "trial_id": winner_row["trial_id"], "mlflow_parent_run_id": parent_id,
        "mlflow_run_id": find_child_run(client, experiment_id, parent_id, winner_row["trial_id"]),
        "families": [{k: row[k] for k in ("family", "score", "params", "macs", "latency_ms")} for row in table],
    }
    elapsed = time.monotonic() - started
    with runtime.atomic_dir(out_dir) as staging:
        runtime.write_json(staging / "best.json", best)
        runtime.write_json(staging / "families.json", {"task": task, "metric": metric, "families": table,
                                                       "trials": rows})
        write_csv(staging / "families.csv", table)
        plot_score_vs_latency(rows, winner_row, metric, staging / "score_vs_latency.png")
        _log_parent(client, parent_id, staging, table, best, rows, elapsed)
    log(format_table(table, metric))
    log(f"search {task}: winner {best['family']} {metric}={best['score']:.4f} "
        f"(trial {best['trial_id']}) in {elapsed:.0f} s; wrote {out_dir}")
    return best


def _log_parent(client: Any, parent_id: str, folder: Path, table: list[dict[str, Any]], best: dict[str, Any],
                rows: list[dict[str, Any]], elapsed: float) -> None:
    """The parent run's record of the search: winner, families table, plot, and a few totals."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    columns = {key: [row[key] for row in table] for key in ("family", "score", "params", "macs", "latency_ms",
                                                            "trials", "errors")}
    client.log_table(parent_id, columns, "families_table.json")
    for name in ("best.json", "families.json", "families.csv", "score_vs_latency.png"):
        client.log_artifact(parent_id, str(folder / name))
    totals = {"best_score": best["score"], "trials": len(rows), "trials_errored": sum(r["status"] == "error"
                                                                                     for r in rows),
              "trial_epochs": sum(r["epochs"] for r in rows), "search_time_s": elapsed}
    client.log_batch(parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in totals.items()])
    for tag, value in (("winner.family", best["family"]), ("winner.trial_id", best["trial_id"]),
                       ("winner.run_id", best["mlflow_run_id"] or "")):
        client.set_tag(parent_id, f"convforge.{tag}", value)
    if best["mlflow_run_id"]:
        client.set_tag(best["mlflow_run_id"], "convforge.winner", "true")
    client.set_terminated(parent_id, "FINISHED")


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


@stage_entry
def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in TASKS:
        raise ConvForgeError(f"usage: python -m pipelines.stages.search {{{'|'.join(TASKS)}}}")
    task = sys.argv[1]
    params = load_params()
    runtime.seed_everything(params.seed, params.deterministic)
    run_search(params, task, Path("data/prepared") / DATA[task], Path("artifacts/search") / task)


if __name__ == "__main__":
    main()
