"""Does the pipeline's own search rank its trials as their final training would? Each trial of the classify search
that `dvc repro` ran, trained as `train@classify` trains the winner, against its score in the search.

The trials come from `artifacts/search/classify/families.json` (the search's record: family, hyperparameters,
training keys, score and the epochs each trial reached before the scheduler stopped it). Each one is handed to the
train stage's own set-up (pipelines/training.py `prepare_choice`, as if it had won: the whole training split,
`train.classify.epochs`, the same seed, engine settings and augmentation) and fitted; its best-validation epoch's
weights are scored on the test split, as `evaluate@classify` scores the champion. The validation score after each
epoch is kept: given the search's items and epochs, each trial's score is the final run's after as many epochs.
Reported: Spearman's rho (and Kendall's tau) between the search's trial scores and the final test scores, the rank
the search's winner reaches among the finals, and the gap between its final test score and the best one.

A final test score is one draw: another seed (initial weights, batch order, augmentation) moves it, by a fair part
of the gaps between the better trials' finals. `--seeds N` trains each trial again under seeds seed+1 .. seed+N-1
and ranks the trials' mean final test score as well, with each trial's spread over the seeds, and says how a
longer trial would have ranked (each final run's validation score after epoch k against that mean); a later run
without `--seeds` keeps as many.

`--budgets 16000x3,allx1` trains each trial again as a search trial (the search's own trial code, seed and engine
settings), on that many items (`all`: the whole training split) for that many epochs, to the end of its schedule,
and ranks those trial scores against the same finals: what another trial budget would have bought, without a new
search and its finals (the search's other draws would differ; these are the same trials). A later run keeps them.

    python bench/trial_vs_final.py              # every trial of the last search (8 on the default run: ~40 min)
    python bench/trial_vs_final.py --trials 4   # 4 of them, spread over the search's score range
    python bench/trial_vs_final.py --seeds 3    # each trial also under 2 more seeds (~80 min more)
    python bench/trial_vs_final.py --budgets 8000x3,16000x3,allx1   # 1-5 min a budget here, 2 trials at once

Needs the default run's outputs first (`dvc repro search@classify`). Each finished trial is written to
bench/results/trial_vs_final.json at once; a rerun on the same search trains only the trials it lacks.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's pipelines, not an installed copy

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)
from bench.machine import Parser, describe, positive, result_file, thread_count  # noqa: E402
from pipelines.engine import EngineSettings, evaluate, fit  # noqa: E402
from pipelines.errors import ConvForgeError  # noqa: E402
from pipelines.params import Params, load_params, validate  # noqa: E402
from pipelines.replay import trial_scores  # noqa: E402
from pipelines.search import trial_inputs, trial_settings  # noqa: E402
from pipelines.tasks import get_task  # noqa: E402
from pipelines.training import prepare_choice  # noqa: E402

TASK = "classify"
SEARCH = ROOT / "artifacts" / "search" / TASK
DATA = ROOT / "data" / "prepared" / TASK
RESULTS = ROOT / "bench" / "results" / "trial_vs_final.json"
TARGET_RHO = 0.8
MIN_RANKED = 3  # fewer trials have no rank correlation worth the name (two give +-1)
TRIAL_KEYS = ("trial_id", "family", "hparams", "train", "score", "epochs", "status")  # what each row reads


def search_record(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A classify search's best.json and families.json."""
    try:
        best, record = (json.loads((folder / name).read_text()) for name in ("best.json", "families.json"))
    except NotADirectoryError:
        raise ConvForgeError(f"{folder} is a file; give the search's folder (best.json, families.json)") from None
    except FileNotFoundError as exc:
        raise ConvForgeError(f"{exc.filename} not found: run `dvc repro search@classify` first") from None
    except json.JSONDecodeError as exc:
        raise ConvForgeError(f"{folder}: not valid JSON ({exc}); rerun `dvc repro search@classify`") from None
    if record.get("task") != TASK or not record.get("trials"):
        raise ConvForgeError(f"{folder / 'families.json'} holds no classify trials; rerun `dvc repro search@classify`")
    lacking = sorted({key for trial in record["trials"] for key in TRIAL_KEYS if key not in trial})
    if lacking or "trial_id" not in best:
        raise ConvForgeError(f"{folder}: trials without {lacking or ['trial_id']}, written by another version; "
                             "rerun `dvc repro search@classify`")
    return best, record


def spread(trials: list[dict[str, Any]], count: int | None) -> list[dict[str, Any]]:
    """`count` scored trials spread evenly over the score range (best and worst included), best first; all of
    them when `count` is None or at least their number."""
    scored = sorted((t for t in trials if t.get("score") is not None), key=lambda t: -t["score"])
    if count is None or count >= len(scored):
        return scored
    if count == 1:
        return scored[:1]
    picks = sorted({round(i * (len(scored) - 1) / (count - 1)) for i in range(count)})
    return [scored[i] for i in picks]


def final_run(trial: dict[str, Any], params: Params, data: Path, test: Any) -> dict[str, Any]:
    """The trial trained as train@classify would train it had it won (under `params.seed`); its best epoch scored
    on `test`: the fit's figures under `final_*` keys, and `seed` and `seconds`."""
    choice = {"family": trial["family"], "model": trial["hparams"], "train": trial["train"]}
    job = prepare_choice(params, TASK, data, choice, ROOT, log=lambda line: None,
                         source_name=f"trial {trial['trial_id']}")
    label = f"{trial['family']} {trial['trial_id']} seed {params.seed}"
    print(f"{label}: trial score {trial['score']:.4f} after {trial['epochs']} epoch(s); training "
          f"{job.cfg.epochs} epochs on {len(job.train):,} items", flush=True)
    started = time.perf_counter()
    result = fit(job.model, TASK, job.train, job.val, job.cfg, job.settings, policy=job.policy,
                 log=lambda line: print(f"  {label}: {line}", flush=True))
    seconds = time.perf_counter() - started
    test_score = evaluate(result.model, TASK, test, job.settings)["accuracy"]
    print(f"{label}: final test accuracy {test_score:.4f} (val {result.best_score:.4f}) in {seconds:.0f} s",
          flush=True)
    return {"seed": params.seed, "final_val_score": result.best_score,
            "final_val_scores": [epoch.score for epoch in result.history], "final_test_score": test_score,
            "seconds": round(seconds, 1)}


def trial_row(trial: dict[str, Any], run: dict[str, Any], final_epochs: int) -> dict[str, Any]:
    """A trial's row: its search record and its final run under the pipeline's seed (`replicates` under others)."""
    return {"trial_id": trial["trial_id"], "family": trial["family"], "hparams": trial["hparams"],
            "train": trial["train"], "trial_epochs": trial["epochs"], "trial_status": trial["status"],
            "trial_score": trial["score"], "final_epochs": final_epochs,
            **{key: value for key, value in run.items() if key != "seed"}, "replicates": []}


def test_scores(row: dict[str, Any]) -> list[float]:
    """A row's final test scores: the pipeline's seed first, then each replicate's."""
    return [row["final_test_score"], *(run["final_test_score"] for run in row.get("replicates", []))]


def seed_spread(rows: list[dict[str, Any]], seeds: int) -> dict[str, Any] | None:
    """Each row's mean final test score over `seeds` seeds (into the row) and the pooled seed-to-seed standard
    deviation; None unless every row has that many."""
    for row in rows:  # figures an earlier run with another --seeds left
        for key in ("final_test_mean", "final_test_sd"):
            row.pop(key, None)
    if seeds < 2 or any(len(test_scores(row)) < seeds for row in rows):
        return None
    for row in rows:
        scores = test_scores(row)[:seeds]
        row["final_test_mean"], row["final_test_sd"] = statistics.fmean(scores), statistics.stdev(scores)
    pooled = statistics.fmean(row["final_test_sd"] ** 2 for row in rows) ** 0.5
    return {"seeds": seeds, "pooled_sd": pooled}


def epoch_rhos(rows: list[dict[str, Any]]) -> list[float | None]:
    """Spearman's rho of each final run's validation score after epoch k (k = 1 .. the final epochs; the pipeline's
    seed) against the seeds' mean final test score: how well a trial of k epochs on every item, on the final
    run's schedule, would have ranked."""
    from scipy.stats import spearmanr

    if len(rows) < MIN_RANKED:
        return []
    epochs = min(len(row["final_val_scores"]) for row in rows)
    mean = [row["final_test_mean"] for row in rows]
    return [finite(spearmanr([row["final_val_scores"][k] for row in rows], mean).statistic) for k in range(epochs)]


def rank_figures(rows: list[dict[str, Any]], winner: str, final_key: str = "final_test_score") -> dict[str, Any]:
    """Spearman's rho and Kendall's tau of trial score against final test score (`final_key`: one seed's or the
    seeds' mean); where the winner ends."""
    from scipy.stats import kendalltau, spearmanr

    trial = [row["trial_score"] for row in rows]
    final = [row[final_key] for row in rows]
    rho = tau = p_value = None
    if len(rows) >= MIN_RANKED:
        result = spearmanr(trial, final)
        rho, p_value, tau = result.statistic, result.pvalue, kendalltau(trial, final).statistic
    by_final = sorted(rows, key=lambda row: -row[final_key])
    won = next((row for row in rows if row["trial_id"] == winner), None)
    return {"trials": len(rows), "spearman_rho": finite(rho), "p_value": finite(p_value), "kendall_tau": finite(tau),
            "winner_final_rank": by_final.index(won) + 1 if won else None,
            "winner_gap_to_best": round(by_final[0][final_key] - won[final_key], 4) if won else None,
            "target_rho": TARGET_RHO}


def finite(value: float | None) -> float | None:
    """A statistic as JSON keeps it: None when undefined (no value, or NaN for tied scores)."""
    return float(value) if value is not None and math.isfinite(value) else None


def read_earlier(path: Path) -> dict[str, Any]:
    """The results an earlier run wrote to `path` ({} when there are none or they do not parse)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(f"{path}: not valid JSON; every trial is trained again", flush=True)
        return {}


def bench_params(epochs: int | None, threads: int | None, seed_offset: int = 0) -> Params:
    """params.yaml, with the final training's epochs and the engine's threads overridden when asked, and its seed
    moved on by `seed_offset`."""
    raw = load_params(ROOT / "params.yaml").model_dump()
    raw["seed"] += seed_offset
    if epochs is not None:
        raw["train"][TASK]["epochs"] = epochs
    if threads is not None:
        raw["train"]["num_threads"] = threads
    return validate(Params, raw)


def train_missing(chosen: list[dict[str, Any]], done: dict[str, dict[str, Any]], args: Any, test: Any,
                  save: Callable[[list[dict[str, Any]]], None]) -> tuple[list[dict[str, Any]], bool]:
    """The chosen trials' rows, `done`'s read back and the others trained: every trial under the pipeline's seed
    first (the figures a default run gives), then under each further seed; `save` after each training. Returns the
    rows and whether anything was trained."""
    params, rows, trained = bench_params(args.epochs, args.threads), [], False
    for trial in chosen:
        if trial["trial_id"] in done:
            rows.append(done[trial["trial_id"]])
            continue
        rows.append(trial_row(trial, final_run(trial, params, args.data, test), params.train.classify.epochs))
        trained = True
        save(rows)
    for offset in range(1, args.seeds):
        seeded = bench_params(args.epochs, args.threads, offset)
        for trial, row in zip(chosen, rows):
            replicates = row.setdefault("replicates", [])
            if all(run["seed"] != seeded.seed for run in replicates):
                replicates.append(final_run(trial, seeded, args.data, test))
                trained = True
                save(rows)
    return rows, trained


def budget_of(label: str) -> tuple[int | None, int]:
    """A budget ITEMSxEPOCHS as (items, None for all; epochs); ValueError when it is not one."""
    items, _, epochs = label.partition("x")
    if not (items == "all" or items.isdigit() and int(items) > 0) or not epochs.isdigit() or int(epochs) < 1:
        raise ValueError(label)
    return (None if items == "all" else int(items)), int(epochs)


def budget_list(text: str) -> list[str]:
    """A `--budgets` flag: comma-separated ITEMSxEPOCHS budgets (ITEMS a count or `all`), as labels."""
    labels = list(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    try:
        for label in labels:
            budget_of(label)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected ITEMSxEPOCHS budgets such as 16000x3 or allx1 (ITEMS a count or "
                                         f"all, EPOCHS >= 1), comma-separated; got {exc.args[0]!r}") from None
    if not labels:
        raise argparse.ArgumentTypeError("expected at least one ITEMSxEPOCHS budget, e.g. 16000x3")
    return labels


def budget_params(params: Params, label: str) -> Params:
    """`params` with the classify search's trials at budget `label` (its train subset and epochs)."""
    items, epochs = budget_of(label)
    raw = params.model_dump()
    raw["search"][TASK].update(train_subset=items, max_epochs=epochs,
                               grace_period=min(epochs, raw["search"][TASK]["grace_period"]))
    return validate(Params, raw)


def budget_settings(params: Params, threads: int | None) -> EngineSettings:
    """How the search runs each trial (its threads a trial), with `threads` when given (0: every core)."""
    settings = trial_settings(params)
    if threads is not None:
        settings = replace(settings, num_threads=threads or len(os.sched_getaffinity(0)))
    return settings


def budget_trial(trial: dict[str, Any], inputs: dict[str, Any], data: Path,
                 settings: EngineSettings) -> tuple[list[float], float]:
    """One trial trained as the search trains it, from `inputs` (`pipelines.search.trial_inputs`), in its own
    process: its validation score after each epoch, and the seconds it took."""
    started = time.perf_counter()
    history = trial_scores(TASK, trial, inputs, data, inputs["max_epochs"], settings, log=None)
    return [epoch.score for epoch in history], round(time.perf_counter() - started, 1)


def train_budgets(labels: list[str], chosen: list[dict[str, Any]], earlier: list[dict[str, Any]], params: Params,
                  args: Any, save: Callable[[list[dict[str, Any]]], None]) -> tuple[list[dict[str, Any]], bool]:
    """Each budget's trial scores of the chosen trials: `earlier`'s read back (same budget and threads), the others
    trained, search.max_concurrent trials at a time; `save` after each. Returns the budgets and whether any trained."""
    settings = budget_settings(params, args.threads)
    done = {entry["budget"]: entry for entry in earlier if entry.get("threads") == settings.num_threads}
    budgets = [done.get(label) or {"budget": label, "threads": settings.num_threads, "scores": {}, "seconds": {}}
               for label in labels]
    jobs = [(entry, trial) for entry in budgets for trial in chosen if trial["trial_id"] not in entry["scores"]]
    if not jobs:
        return budgets, False
    inputs = {label: trial_inputs(budget_params(params, label), TASK) for label in labels}
    workers = max(1, min(params.search.max_concurrent, len(jobs),
                         len(os.sched_getaffinity(0)) // settings.num_threads))
    trained = ", ".join(dict.fromkeys(entry["budget"] for entry, _ in jobs))
    print(f"training {len(jobs)} trial(s) at budgets {trained}, {workers} at a time, {settings.num_threads} "
          "thread(s) each", flush=True)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(budget_trial, trial, inputs[entry["budget"]], args.data, settings): (entry, trial)
                   for entry, trial in jobs}
        for future in as_completed(pending):
            entry, trial = pending[future]
            scores, seconds = future.result()
            entry["scores"][trial["trial_id"]], entry["seconds"][trial["trial_id"]] = scores, seconds
            print(f"budget {entry['budget']}: {trial['family']} {trial['trial_id']}: validation accuracy "
                  f"{' '.join(f'{score:.4f}' for score in scores)} ({seconds:.0f} s)", flush=True)
            save(budgets)
    return budgets, True


def budget_figures(entry: dict[str, Any], rows: list[dict[str, Any]], train_items: int,
                   mean: bool) -> dict[str, Any]:
    """A budget's rank figures: its trial scores (the last epoch's) against the finals, where the trial it ranks
    first ends; the items a trial sees (a subset as large as the split is all of it) and the trial-seconds taken."""
    items, epochs = budget_of(entry["budget"])
    scored = [{**row, "trial_score": entry["scores"][row["trial_id"]][-1]} for row in rows]
    top = max(scored, key=lambda row: row["trial_score"])["trial_id"]
    figures = {"trial_items": min(items or train_items, train_items) * epochs, "top_trial": top,
               "ranks": rank_figures(scored, top),
               "trial_seconds": round(sum(entry["seconds"][row["trial_id"]] for row in rows), 1)}
    if mean:
        figures["seed_mean"] = rank_figures(scored, top, "final_test_mean")
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=positive, default=None, help="trials trained, spread over the score "
                        "range (default: every trial of the search)")
    parser.add_argument("--epochs", type=positive, default=None, help="final training epochs (default: "
                        "train.classify.epochs)")
    parser.add_argument("--seeds", type=positive, default=None, help="train each trial under this many seeds: "
                        "params.yaml's seed, then the next ones; ranks their mean final test score too (default: "
                        "as many as the results of the same search already hold, else 1)")
    parser.add_argument("--budgets", type=budget_list, default=None, help="trial budgets ITEMSxEPOCHS (ITEMS a "
                        "count or all), comma-separated: each trial trained again as a search trial at each, ranked "
                        "against the same finals (default: those the results of the same search already hold)")
    parser.add_argument("--threads", type=thread_count, default=None, help="torch threads (default: "
                        "train.num_threads; a --budgets trial: the search's threads a trial)")
    parser.add_argument("--search", type=Path, default=SEARCH, help="the search's folder (best.json, families.json)")
    parser.add_argument("--data", type=Path, default=DATA, help="the prepared classify data the search ran on")
    parser.add_argument("--out", type=result_file, default=RESULTS)
    parser.add_argument("--note", default=None, help="what the reader should know about this run (kept in the JSON)")
    args = parser.parse_args(argv)
    params = bench_params(args.epochs, args.threads)
    try:
        best, record = search_record(args.search)
        chosen = spread(record["trials"], args.trials)
        test = get_task(TASK).load_split(args.data, "test")
        train_items = len(get_task(TASK).load_split(args.data, "train"))
    except ConvForgeError as exc:
        sys.exit(f"bench/trial_vs_final.py: {exc}")
    out = {"search_run_id": best.get("mlflow_parent_run_id"), "winner": best["trial_id"],
           "search_trials": len(record["trials"]),
           "search": {key: getattr(params.search.classify, key)
                      for key in ("num_samples", "max_epochs", "grace_period", "train_subset")}
           | {"scheduler": params.search.scheduler, "reduction_factor": params.search.reduction_factor},
           "final_epochs": params.train.classify.epochs, "seed": params.seed,
           "threads": params.train.num_threads, "train_items": train_items, "test_items": len(test),
           "machine": describe()}
    earlier = read_earlier(args.out)
    # A rerun on the same search and settings picks up where an interrupted one stopped (more seeds: adds them).
    same = all(earlier.get(key) == out[key] for key in ("search_run_id", "final_epochs", "seed", "threads",
                                                          "test_items"))
    done = {row["trial_id"]: row for row in earlier.get("rows", [])} if same else {}
    args.seeds = args.seeds or (earlier.get("seeds", 1) if same else 1)
    earlier_budgets = earlier.get("budgets", []) if same else []
    labels = list(dict.fromkeys([*(entry["budget"] for entry in earlier_budgets), *(args.budgets or [])]))
    flags = [f"--{key} {value}" for key, value in (("trials", args.trials), ("epochs", args.epochs),
                                                    ("seeds", args.seeds if args.seeds > 1 else None),
                                                    ("budgets", ",".join(labels) or None),
                                                    ("threads", args.threads)) if value is not None]
    out |= {"command": " ".join(["python bench/trial_vs_final.py", *flags]), "seeds": args.seeds}
    if args.note or earlier.get("note"):
        out["note"] = args.note or earlier["note"]

    def save(rows_so_far: list[dict[str, Any]], budgets_so_far: list[dict[str, Any]] = earlier_budgets) -> None:
        runtime.write_json(args.out, {**out, "complete": False, "rows": rows_so_far, "budgets": budgets_so_far})

    try:
        rows, trained = train_missing(chosen, done, args, test, save)
        budgets, budgets_trained = train_budgets(labels, chosen, earlier_budgets, params, args,
                                                 lambda budgets_so_far: save(rows, budgets_so_far))
    except ConvForgeError as exc:
        sys.exit(f"bench/trial_vs_final.py: {exc}")  # names the trial
    trained = trained or budgets_trained
    if not trained:
        out["machine"] = earlier.get("machine", out["machine"])  # where the rows were measured
    figures = {"ranks": rank_figures(rows, best["trial_id"])}
    spread_figures = seed_spread(rows, args.seeds)
    if spread_figures:
        figures["seed_mean"] = (spread_figures | rank_figures(rows, best["trial_id"], "final_test_mean")
                                | {"val_epoch_rhos": epoch_rhos(rows)})
    for entry in budgets:  # kept whatever the trials' number (rank figures need MIN_RANKED: None below)
        entry.update(budget_figures(entry, rows, train_items, spread_figures is not None))
    if budgets:
        figures["budgets"] = budgets
    runtime.write_json(args.out, {**out, "complete": True, "rows": rows, **figures})
    ranks, mean = figures["ranks"], figures.get("seed_mean")
    print(f"\n{'family':<13} {'trial':>8} {'epochs':>6} {'final test':>10}"
          + (f" {f'mean of {args.seeds}':>10} {'sd':>7}" if mean else ""))
    for row in sorted(rows, key=lambda row: -row["trial_score"]):
        print(f"{row['family']:<13} {row['trial_score']:>8.4f} {row['trial_epochs']:>6} "
              f"{row['final_test_score']:>10.4f}"
              + (f" {row['final_test_mean']:>10.4f} {row['final_test_sd']:>7.4f}" if mean else ""))
    for label, figure in ((f"seed {params.seed}", ranks), (f"mean of {args.seeds} seeds", mean)):
        if figure:
            print(f"{label}: Spearman rho {figure['spearman_rho']} (target >= {TARGET_RHO}), Kendall tau "
                  f"{figure['kendall_tau']}; the winner ends #{figure['winner_final_rank']} of {len(rows)}, "
                  f"{figure['winner_gap_to_best']} below the best")
    for entry in figures.get("budgets", []):
        print(f"trial budget {entry['budget']} ({entry['trial_items']:,} items a trial, {entry['trial_seconds']:.0f} "
              f"trial-seconds): Spearman rho {entry['ranks']['spearman_rho']} at seed {params.seed}"
              + (f", {entry['seed_mean']['spearman_rho']} on the mean" if "seed_mean" in entry else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
