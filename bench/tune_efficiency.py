"""Tuning efficiency: do early trial scores predict, and what ASHA saves on a realistic search; Ray's overhead.

Per seed, the same random trials (Ray's random search seeded alike, each family first at its defaults)
run four times with the project's trainable: under Ray Tune's ASHAScheduler (ASHA's stopping rule),
under ASHA with promotions as Li et al. 2020 have it (`search.scheduler: asha_promote`,
pipelines/tuner.py `PromotingHalving`), under synchronous successive halving (`sha`, the same class
deciding each rung once all trials hold a score there) and under FIFO, every trial trained for `--epochs`.
Each search's pick (its best trial by its last validation score) is scored on a held-out test split the search never
saw. Reported:

- rank correlation: per seed, for its FIFO trials, the "trial score" (validation score at the grace
  period, what ASHA decides on) against the "final test score" (the same trial at full budget, its
  best-validation epoch's weights on the test split), as Spearman's rho with its p-value;
- per seed and ASHA variant, the trial-epochs FIFO trains over those ASHA trains, and whether the two
  picks' test scores are equal (within `TARGETS["best_test_gap"]`);
- Ray Tune's overhead per trial of a no-op trainable, with and without actor reuse.

`--precise-bn 0` runs the same trials validated with training's running BatchNorm averages (the baseline of
BENCHMARKS.md's rank tables, bench/results/tune_efficiency_running_bn.json).
`--warmup-epochs 0` runs the same trials without the learning rate's linear warm-up (params.yaml's
train.classify.warmup_epochs is 1; bench/results/tune_efficiency_no_warmup.json: on seed 42 the first rung then
ranks worse, so the warm-up is not what holds the rank target back).

Targets (`TARGETS`): rho >= 0.8 on every seed; ASHA at least 3x fewer trial-epochs with an equal best on every
seed (each variant judged on its own); at most 0.2 s of overhead per trial with actor reuse.

    .venv/bin/python bench/tune_efficiency.py

Data: data/prepared/classify (Fashion-MNIST, `dvc repro augment` first; default): as in the pipeline's search,
each trial trains on search.classify.train_subset items and is scored on the whole val split; the picks are
tested on the whole test split. Or `--data digits`: scikit-learn's digits upscaled to 16x16. Writes
bench/results/tune_efficiency.json.
"""

from __future__ import annotations

import argparse
import functools
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)
from bench.machine import Parser, describe, load_average, positive, result_file, whole  # noqa: E402
from pipelines.errors import ConvForgeError  # noqa: E402

TARGETS = {"spearman_rho": 0.8, "asha_epochs_ratio": 3.0, "best_test_gap": 0.005, "reuse_overhead_s": 0.2}
# The ASHA variants a seed runs (search.scheduler names), as the summary labels them.
VARIANTS = {"asha": "stopping (Ray)", "asha_promote": "promotions", "sha": "synchronous"}
CPUS = 2  # the local Ray's; the trials share them --concurrent at a time
# Settings a results file written before they were recorded ran with.
UNRECORDED = {"warmup_epochs": 1}


def asha_variants(search: dict) -> dict[str, dict]:
    """Each ASHA variant one seed's search ran, by name: its figures with its ratio, gap and equal best against
    FIFO (the stopping rule's sit at the search's top level, as the baseline results have them)."""
    found = {"asha": {**search["asha"], **{key: search[key] for key in ("epochs_ratio", "test_gap", "equal_best")}}}
    return {**found, **{name: search[name] for name in VARIANTS if name != "asha" and name in search}}


def targets_met(ranks: list[dict], searches: list[dict], reuse_s: float) -> dict[str, bool]:
    """Each target of `TARGETS` against one run's figures; the rank and ASHA targets hold only when every seed
    meets them, each ASHA variant (`<name>_epochs_ratio`) on its own."""
    met = {"spearman_rho": bool(ranks) and all(r["spearman_rho"] is not None
                                               and r["spearman_rho"] >= TARGETS["spearman_rho"] for r in ranks)}
    for name in VARIANTS:
        variants = [asha_variants(s).get(name) for s in searches]
        met[f"{name}_epochs_ratio"] = bool(variants) and all(
            v is not None and v["epochs_ratio"] >= TARGETS["asha_epochs_ratio"] and v["equal_best"] for v in variants)
    return {**met, "reuse_overhead_s": reuse_s <= TARGETS["reuse_overhead_s"]}


def digits_data(seed: int):
    """sklearn digits as prepared-style tensors: 16x16, 60/20/20 train/val/test split, train mean/std."""
    import torch
    from sklearn.datasets import load_digits
    from torchvision.transforms.v2 import functional as F

    from pipelines.datasets import ClassifyData

    digits = load_digits()
    images = torch.from_numpy((digits.images * 255 / 16).round().astype("uint8"))[:, None]
    images = F.resize(images, [16, 16], antialias=True)
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cuts = [int(0.6 * len(order)), int(0.8 * len(order))]
    splits = [order[:cuts[0]], order[cuts[0]:cuts[1]], order[cuts[1]:]]
    pixels = images[splits[0]].float() / 255
    mean, std = [pixels.mean().item()], [pixels.std().item()]
    classes = [str(i) for i in range(10)]
    return tuple(ClassifyData(images[idx], labels[idx], classes, mean, std) for idx in splits)


def load_data(args, seed: int, train_subset: int | None):
    """(name, train, val, test): the test split only ever scores the searches' picks; `--train` defaults to
    `train_subset` (the search's)."""
    from pipelines.datasets import load_classify

    if args.data == "digits":
        return ("digits 16x16", *digits_data(seed))
    root = ROOT / "data/prepared/classify"
    return ("Fashion-MNIST subsets", *(load_classify(root, split).subset(n, seed) for split, n in
                                       (("train", args.train or train_subset), ("val", args.val), ("test", args.test))))


def write_prepared(folder: Path, train, val) -> Path:
    """The search's splits in the prepared-data layout on disk: trials read their data from paths, like the
    pipeline's. The test split stays out of it."""
    from pipelines.datasets import save_array

    for split, data in (("train", train), ("val", val)):
        save_array(folder / split / "images.npy", data.images.permute(0, 2, 3, 1).numpy())
        save_array(folder / split / "labels.npy", data.labels.numpy())
    meta = {"classes": train.classes, "in_channels": train.in_channels, "image_size": train.image_size,
            "mean": train.mean, "std": train.std}
    runtime.write_json(folder / "meta.json", meta)
    return folder


def run_search(label: str, scheduler, trainable, space, points, args, storage: str, seed: int, drawn: int):
    """One search over the random trials with `scheduler` (None = FIFO, every trial at full budget), the
    searcher holding `drawn` trials at a time (0: all; the trials' resources still run `--concurrent` at a
    time); returns its figures and Ray's ResultGrid."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from pipelines.tasks import PRIMARY
    from pipelines.tuner import MODE, trial_dirname

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": CPUS / args.concurrent}), param_space=space.ray_space(),
        tune_config=tune.TuneConfig(
            metric=PRIMARY["classify"], mode=MODE, scheduler=scheduler, num_samples=args.samples,
            search_alg=BasicVariantGenerator(points_to_evaluate=points, max_concurrent=drawn, random_state=seed),
            reuse_actors=True, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=label, storage_path=storage, verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    started = time.perf_counter()
    grid = tuner.fit()
    figures = {"trial_epochs": sum(int(r.metrics.get("epoch", 0)) for r in grid if r.metrics),
               "wall_s": time.perf_counter() - started, "trials": len(grid), "errors": grid.num_errors}
    return figures, grid


def finished(grid) -> list:
    """The trials of a ResultGrid that reported a usable score and kept a checkpoint."""
    from pipelines.tasks import PRIMARY

    metric = PRIMARY["classify"]
    return [r for r in grid if r.checkpoint is not None and isinstance(r.metrics.get(metric), (int, float))
            and math.isfinite(r.metrics[metric])]


def test_score(result, space, train, test, seed: int, settings) -> float:
    """A trial's final model (its best-validation epoch's weights, what `fit` returns) scored on the test split."""
    import torch

    from pipelines.engine import CHECKPOINT, evaluate
    from pipelines.recipe import run_model
    from pipelines.tasks import get_task

    chosen = space.choice(result.config)
    model = run_model("classify", chosen.family, chosen.hparams, train, seed)[1]
    saved = torch.load(Path(result.checkpoint.path) / CHECKPOINT, map_location="cpu", weights_only=True)
    model.load_state_dict(saved["best_state"])
    return evaluate(model, "classify", test, settings)[get_task("classify").metric]


def pick(grid):
    """What a search delivers: its trial with the best last validation score."""
    from pipelines.tasks import PRIMARY

    results = finished(grid)
    return max(results, key=lambda r: r.metrics[PRIMARY["classify"]]) if results else None


def rank_rows(grid, space, grace_period: int, test_of) -> list[dict]:
    """Each full-budget trial's family, its score at the grace period, its validation score after every
    epoch and its final test score."""
    from pipelines.tuner import SCORES

    rows = [{"family": space.choice(r.config).family, "trial_score": r.metrics[SCORES][grace_period - 1],
             "val_scores": [float(v) for v in r.metrics[SCORES]], "final_test_score": test_of(r)}
            for r in finished(grid)]
    return sorted(rows, key=lambda row: -row["trial_score"])


def rank_by_rung(rows: list[dict], epochs: int) -> list[dict]:
    """Spearman's rho of the validation score after each epoch (a first rung there) against the final
    test score: how late ASHA's first decision must come for trial scores to predict."""
    by_rung = []
    for rung in range(1, epochs + 1):
        at = [{"trial_score": row["val_scores"][rung - 1], "final_test_score": row["final_test_score"]}
              for row in rows if len(row["val_scores"]) >= rung]  # a trial that failed midway reported fewer
        rho, p = spearman(at)
        by_rung.append({"epochs": rung, "trials": len(at), "spearman_rho": rho, "p_value": p})
    return by_rung


def spearman(rows: list[dict]) -> tuple[float | None, float | None]:
    """Spearman's rho and its p-value of trial score against final test score (None when undefined)."""
    from scipy.stats import spearmanr

    if len(rows) < 3:
        return None, None
    result = spearmanr([r["trial_score"] for r in rows], [r["final_test_score"] for r in rows])
    rho, p = float(result.statistic), float(result.pvalue)
    return (rho, p) if math.isfinite(rho) else (None, None)


def scored(figures: dict, grid, test_of) -> dict:
    """A search's figures with its pick's validation and test score."""
    from pipelines.tasks import PRIMARY

    best = pick(grid)
    return {**figures, "best_val": best.metrics[PRIMARY["classify"]] if best else None,
            "best_test": test_of(best) if best else None}


def against(asha: dict, full: dict) -> dict:
    """An ASHA search against FIFO: the trial-epochs ratio, the picks' test gap and whether they are equal."""
    gap = None if None in (asha["best_test"], full["best_test"]) else full["best_test"] - asha["best_test"]
    return {"epochs_ratio": full["trial_epochs"] / max(1, asha["trial_epochs"]), "test_gap": gap,
            "equal_best": gap is not None and abs(gap) <= TARGETS["best_test_gap"]}


def compare(seed: int, searches: dict[str, tuple[dict, object]], test_of) -> dict:
    """One seed's searches (each of `VARIANTS` and "full_budget": figures and ResultGrid) scored; each ASHA
    variant against FIFO (the stopping rule's at the top level, as the baseline results have it)."""
    figures = {name: scored(found, grid, test_of) for name, (found, grid) in searches.items()}
    full = figures["full_budget"]
    out = {"seed": seed, "asha": figures["asha"], "full_budget": full, **against(figures["asha"], full)}
    return {**out, **{name: {**figures[name], **against(figures[name], full)}
                      for name in VARIANTS if name != "asha" and name in figures}}


def noop(config: dict) -> None:
    from ray import tune

    tune.report({"score": 1.0})


def overhead(trials: int, reuse: bool, storage: str) -> float:
    """Seconds per trial of a trainable that does nothing, at most 2 at a time."""
    from ray import tune

    tuner = tune.Tuner(tune.with_resources(noop, {"cpu": 1}), param_space={"x": tune.uniform(0, 1)},
                       tune_config=tune.TuneConfig(num_samples=trials, reuse_actors=reuse, max_concurrent_trials=2),
                       run_config=tune.RunConfig(name=f"noop-{reuse}", storage_path=storage, verbose=0))
    started = time.perf_counter()
    tuner.fit()
    return (time.perf_counter() - started) / trials


def trial_overrides(args: argparse.Namespace) -> dict:
    """The train.classify keys the command line sets for the trials (`--precise-bn`, `--warmup-epochs`)."""
    given = {"precise_bn": args.precise_bn, "warmup_epochs": args.warmup_epochs}
    return {key: value for key, value in given.items() if value is not None}


def parse_args() -> argparse.Namespace:
    """The command line; out-of-range sizes are a one-line usage error."""
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=positive, default=24, help="trials per search")
    parser.add_argument("--epochs", type=positive, default=9, help="full budget (epochs) of a trial")
    parser.add_argument("--grace-period", type=positive, default=1, help="ASHA's first rung (epochs)")
    parser.add_argument("--reduction-factor", type=positive, default=3, help="ASHA keeps 1/this of the trials per rung")
    parser.add_argument("--seeds", type=positive, default=3,
                        help="searches per scheduler, seeded params.seed + 0, 1, ...")
    parser.add_argument("--data", choices=["fashion-mnist", "digits"], default="fashion-mnist",
                        help="data/prepared/classify (run `dvc repro augment` first) or digits (bundled)")
    parser.add_argument("--train", type=positive, default=None,
                        help="training items of a trial (default: search.classify.train_subset of params.yaml, what "
                             "the pipeline's trials train on)")
    parser.add_argument("--val", type=positive, default=None,
                        help="validation items (default: the whole val split, what the pipeline's trials score on)")
    parser.add_argument("--test", type=positive, default=None, help="test items (default: the whole test split)")
    parser.add_argument("--families", nargs="+", default=None,
                        help="families searched (default: search.classify.families of params.yaml)")
    parser.add_argument("--precise-bn", type=whole, default=None,
                        help="train.classify.precise_bn of the trials (default: params.yaml's); 0 validates with "
                             "training's running BatchNorm averages")
    parser.add_argument("--warmup-epochs", type=whole, default=None,
                        help="train.classify.warmup_epochs of the trials (default: params.yaml's)")
    parser.add_argument("--concurrent", type=positive, default=2)
    parser.add_argument("--noop-trials", type=positive, default=100)
    parser.add_argument("--noop-trials-no-reuse", type=positive, default=10)
    parser.add_argument("--add-variant", choices=[name for name in VARIANTS if name != "asha"], default=None,
                        help="run only this ASHA variant on each seed of --out (an earlier run with the same settings)"
                             " and add it there beside that run's searches; FIFO's figures are that run's (training "
                             "is deterministic on one CPU model; on another the scores may differ slightly, "
                             "and the run says so)")
    parser.add_argument("--note", default="", help="how this run differs from the default (recorded in the JSON)")
    parser.add_argument("--out", type=result_file, default=ROOT / "bench/results/tune_efficiency.json")
    args = parser.parse_args()
    if args.reduction_factor < 2:
        parser.error("--reduction-factor must be at least 2")
    if args.grace_period > args.epochs:
        parser.error("--grace-period must not exceed --epochs")
    return args


def command_line(argv: list[str]) -> str:
    """The command that reproduces the figures: the script with its flags, less --note and --out (they only
    label and place the result)."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.split("=")[0] in ("--note", "--out"):
            skip = not skip and "=" not in arg
            continue
        kept.append(arg)
    return shlex.join(["python", "bench/tune_efficiency.py", *kept])


def rho_text(rho: float | None, digits: int = 3) -> str:
    return "n/a" if rho is None else f"{rho:.{digits}f}"


def rank_of(seed: int, rows: list[dict], epochs: int) -> dict:
    """One seed's rank correlation: rho and p at the grace period, its trials, and rho had the first rung come
    after each epoch."""
    rho, p = spearman(rows)
    return {"seed": seed, "spearman_rho": rho, "p_value": p, "rows": rows, "by_rung": rank_by_rung(rows, epochs)}


def print_summary(ranks: list[dict], searches: list[dict], over: dict) -> None:
    """The run's figures as the terminal shows them at the end."""
    print()
    for rank in ranks:
        p = "" if rank["p_value"] is None else f" (p {rank['p_value']:.2g})"
        print(f"rank correlation, seed {rank['seed']}, {len(rank['rows'])} trials: Spearman rho "
              f"{rho_text(rank['spearman_rho'])}{p}")
        print("  with the first rung after " + ", ".join(f"{r['epochs']} ep: {rho_text(r['spearman_rho'], 2)}"
                                                         for r in rank["by_rung"]))
    print(f"{'seed':>6} {'ASHA variant':<18}{'ASHA ep':>9}{'FIFO ep':>9}{'ratio':>7}{'ASHA test':>11}"
          f"{'FIFO test':>11}{'equal':>7}")
    for s in searches:
        full = s["full_budget"]
        for name, versus in asha_variants(s).items():
            print(f"{s['seed']:>6} {VARIANTS[name]:<18}{versus['trial_epochs']:>9}{full['trial_epochs']:>9}"
                  f"{versus['epochs_ratio']:>7.2f}{versus['best_test'] or 0:>11.4f}{full['best_test'] or 0:>11.4f}"
                  f"{'yes' if versus['equal_best'] else 'no':>7}")
    trials = over["trials"]
    print(f"Ray Tune overhead, no-op trainable: {over['reuse_actors']:.3f} s/trial with actor reuse "
          f"({trials['reuse_actors']} trials), {over['no_reuse']:.3f} s/trial without ({trials['no_reuse']} trials)")


def seed_search(name: str | None, seed: int, prepared: Path, storage: str, args, base, space, points, settings,
                policy):
    """One seed's search under scheduler `name` (None: FIFO, every trial at full budget): figures and ResultGrid."""
    from ray import tune

    from pipelines.tuner import PAUSING, TrialData, make_scheduler, train_trial

    trainable = tune.with_parameters(train_trial, task="classify", space=space,
                                     data=TrialData(str(prepared), None, seed), base=base, settings=settings,
                                     policy=policy)
    scheduler = name and make_scheduler(name, args.epochs, args.grace_period, args.reduction_factor, space,
                                        num_samples=args.samples)
    # Paused trials count as running for the searcher: under pausing schedulers it draws them all up front.
    drawn = 0 if name in PAUSING else args.concurrent
    return run_search(f"{name or 'full_budget'}-{seed}", scheduler, trainable, space, points, args, storage, seed,
                      drawn)


def settings_of(args, base, families: list[str], train_data, val_data, test_data) -> dict:
    """What a run's searches depend on, as its JSON records them (a variant is added only to a run alike)."""
    return {"families": families, "trials": args.samples, "max_epochs": args.epochs,
            "grace_period": args.grace_period, "reduction_factor": args.reduction_factor,
            "max_concurrent": args.concurrent, "precise_bn": base.precise_bn,
            "warmup_epochs": base.warmup_epochs, "train_items": len(train_data),
            "val_items": len(val_data), "test_items": len(test_data)}


def differing(result: dict, mine: dict) -> list[str]:
    """The settings of `mine` that an earlier run's `result` ran otherwise (one it did not record: `UNRECORDED`)."""
    return [key for key, value in mine.items() if result.get(key, UNRECORDED.get(key)) != value]


def add_variant(args, base, space, points, settings, policy, data: tuple, machine: dict) -> None:
    """`--add-variant`: the variant's search on each seed of the run in `--out`, scored against that run's FIFO
    search; the run's JSON gains it per seed, its verdicts recomputed, and a record of this addition."""
    import json

    name = args.add_variant
    if not args.out.is_file():
        raise ConvForgeError(f"--add-variant needs an earlier run's results in {args.out}")
    try:
        result = json.loads(args.out.read_text())
    except json.JSONDecodeError as exc:
        raise ConvForgeError(f"{args.out} is not a results file: {exc}") from exc
    data_name, train_data, val_data, test_data = data
    mine = {"data": data_name, **settings_of(args, base, list(space.families), train_data, val_data, test_data)}
    differ = differing(result, mine)
    if differ:
        raise ConvForgeError(f"{args.out} ran other settings ({', '.join(differ)}): rerun it whole")
    same_cpu = result.get("machine", {}).get("cpu") == machine.get("cpu")
    if not same_cpu:
        print(f"warning: {args.out}'s searches ran on {result.get('machine', {}).get('cpu')}, this one on "
              f"{machine.get('cpu')}: the same trial's scores may differ slightly", flush=True)
    with tempfile.TemporaryDirectory(prefix="tune-bench-") as storage:
        prepared = write_prepared(Path(storage) / "prepared", train_data, val_data)
        for search in result["searches"]:
            seed = search["seed"]
            found, grid = seed_search(name, seed, prepared, storage, args, base, space, points, settings, policy)
            test_of = functools.partial(test_score, space=space, train=train_data, test=test_data, seed=seed,
                                        settings=settings)
            figures = scored(found, grid, test_of)
            search[name] = {**figures, **against(figures, search["full_budget"])}
            print(f"seed {seed} ASHA, {VARIANTS[name]}: {found['trial_epochs']} trial-epochs, {found['wall_s']:.0f} s; "
                  f"pick's test score {figures['best_test']}", flush=True)
    over = result["overhead_s_per_trial"]
    print_summary(result["ranks"], result["searches"], over)
    result["targets_met"] = targets_met(result["ranks"], result["searches"], over["reuse_actors"])
    result.setdefault("added", []).append({"variant": name, "command": command_line(sys.argv[1:]),
                                           "note": args.note, "machine": machine, "same_cpu": same_cpu})
    runtime.write_json(args.out, result)
    print(f"added {name} to {args.out}")


def main() -> None:
    args = parse_args()
    machine = describe()

    import ray
    import torch

    from pipelines.engine import EngineSettings
    from pipelines.params import load_params
    from pipelines.search_space import SearchSpace
    from pipelines.tuner import init_ray, trial_base

    torch.set_num_threads(1)  # the driver only scores picks; the trials have the cores
    params = load_params(ROOT / "params.yaml")
    families = args.families or list(params.search.classify.families)
    data_name, train_data, val_data, test_data = load_data(args, params.seed, params.search.classify.train_subset)
    space = SearchSpace.build("classify", families, params.search.classify.space, params.search.classify.model_space)
    base = trial_base(params.train.classify.updated(**trial_overrides(args)), args.epochs)
    points = space.points(base)[:args.samples]
    settings = EngineSettings.from_params(params.model_copy(
        update={"train": params.train.model_copy(update={"num_threads": 1})}))
    init_ray(num_cpus=CPUS)
    if args.add_variant:
        add_variant(args, base, space, points, settings, params.augment.policy,
                    (data_name, train_data, val_data, test_data), machine)
        ray.shutdown()
        return
    print(f"data: {data_name}, {len(train_data)} train / {len(val_data)} val / {len(test_data)} test; "
          f"{args.seeds} seeds x {args.samples} trials of {families}, <= {args.epochs} epochs, ASHA grace "
          f"{args.grace_period} and reduction factor {args.reduction_factor}, {args.concurrent} at a time, "
          f"precise_bn {base.precise_bn}, warmup_epochs {base.warmup_epochs}")
    searches, ranks = [], []
    with tempfile.TemporaryDirectory(prefix="tune-bench-") as storage:
        prepared = write_prepared(Path(storage) / "prepared", train_data, val_data)
        for seed in range(params.seed, params.seed + args.seeds):
            found = {}
            runs = [*((name, f"ASHA, {label}") for name, label in VARIANTS.items()), ("full_budget", "FIFO")]
            for name, label in runs:
                found[name] = seed_search(None if name == "full_budget" else name, seed, prepared, storage, args,
                                          base, space, points, settings, params.augment.policy)
                print(f"seed {seed} {label}: {found[name][0]['trial_epochs']} trial-epochs, "
                      f"{found[name][0]['wall_s']:.0f} s", flush=True)

            test_of = functools.partial(test_score, space=space, train=train_data, test=test_data, seed=seed,
                                        settings=settings)
            searches.append(compare(seed, found, test_of))
            ranks.append(rank_of(seed, rank_rows(found["full_budget"][1], space, args.grace_period, test_of),
                                 args.epochs))
            print(f"seed {seed} Spearman rho at the grace period: {rho_text(ranks[-1]['spearman_rho'])}", flush=True)
        reuse = overhead(args.noop_trials, True, storage)
        fresh = overhead(args.noop_trials_no_reuse, False, storage)
    ray.shutdown()

    over = {"reuse_actors": reuse, "no_reuse": fresh,
            "trials": {"reuse_actors": args.noop_trials, "no_reuse": args.noop_trials_no_reuse}}
    print_summary(ranks, searches, over)
    runtime.write_json(args.out, {
        "command": command_line(sys.argv[1:]), "data": data_name,
        **settings_of(args, base, families, train_data, val_data, test_data),
        "ranks": ranks, "searches": searches, "overhead_s_per_trial": over,
        "targets": TARGETS, "targets_met": targets_met(ranks, searches, reuse), "note": args.note,
        "machine": {**machine, "load_avg_at_end": load_average()},
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except ConvForgeError as exc:
        sys.exit(f"tune_efficiency: {exc}")
