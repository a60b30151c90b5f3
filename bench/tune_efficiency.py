"""Tuning efficiency: ASHA vs every trial at full budget (same random trials), and Ray Tune's per-trial overhead.

Both searches draw the same trials (Ray's random search, same seed, each family first at its
defaults) and differ only in the scheduler: ASHA stops the weak trials early, FIFO trains every
trial for `--epochs`. Reported: best validation accuracy, total trial-epochs and wall time. The
overhead part runs a no-op trainable many times, with and without actor reuse.
Targets (`TARGETS`): ASHA's best score within 0.01 of the full budget's with at most 75% of its
trial-epochs, and at most 0.2 s of Ray overhead per trial with actor reuse.

    .venv/bin/python bench/tune_efficiency.py

Data: scikit-learn's digits upscaled to 16x16 (default), or `--data fashion-mnist`: subsets of
data/prepared/classify. Writes bench/results/tune_efficiency.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)
from bench.machine import describe  # noqa: E402

TARGETS = {"score_gap": 0.01, "epochs_fraction": 0.75, "reuse_overhead_s": 0.2}


def targets_met(asha: dict, full: dict, reuse_s: float) -> dict[str, bool]:
    """Each target of `TARGETS` against one run's figures."""
    gap = (full["best_score"] or 0) - (asha["best_score"] or 0)
    return {"score_gap": gap <= TARGETS["score_gap"],
            "epochs_fraction": asha["trial_epochs"] <= TARGETS["epochs_fraction"] * full["trial_epochs"],
            "reuse_overhead_s": reuse_s <= TARGETS["reuse_overhead_s"]}


def digits_data(seed: int):
    """sklearn digits as prepared-style tensors: 16x16, 80/20 split, train mean/std."""
    import torch
    from sklearn.datasets import load_digits
    from torchvision.transforms.v2 import functional as F

    from pipelines.datasets import ClassifyData

    digits = load_digits()
    images = torch.from_numpy((digits.images * 255 / 16).round().astype("uint8"))[:, None]
    images = F.resize(images, [16, 16], antialias=True)
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(order))
    train_idx, val_idx = order[:cut], order[cut:]
    pixels = images[train_idx].float() / 255
    mean, std = [pixels.mean().item()], [pixels.std().item()]
    classes = [str(i) for i in range(10)]
    return (ClassifyData(images[train_idx], labels[train_idx], classes, mean, std),
            ClassifyData(images[val_idx], labels[val_idx], classes, mean, std))


def load_data(args, seed: int):
    from pipelines.datasets import load_classify

    if args.data == "digits":
        return ("digits 16x16", *digits_data(seed))
    root = ROOT / "data/prepared/classify"
    return ("fashion-mnist subset", load_classify(root, "train").subset(args.train, seed),
            load_classify(root, "val").subset(args.val, seed))


def write_prepared(folder: Path, train, val) -> Path:
    """The splits in the prepared-data layout on disk: trials read their data from paths, like the pipeline's."""
    import json

    from pipelines.datasets import save_array

    for split, data in (("train", train), ("val", val)):
        save_array(folder / split / "images.npy", data.images.permute(0, 2, 3, 1).numpy())
        save_array(folder / split / "labels.npy", data.labels.numpy())
    meta = {"classes": train.classes, "in_channels": train.in_channels, "image_size": train.image_size,
            "mean": train.mean, "std": train.std}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def run_search(label: str, scheduler, trainable, space, points, args, storage: str, seed: int) -> dict:
    """One search over the random trials with `scheduler` (None = FIFO, every trial at full budget)."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from pipelines.tasks import PRIMARY
    from pipelines.tuner import MODE, trial_dirname

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}), param_space=space.ray_space(),
        tune_config=tune.TuneConfig(
            metric=PRIMARY["classify"], mode=MODE, scheduler=scheduler, num_samples=args.samples,
            search_alg=BasicVariantGenerator(points_to_evaluate=points, max_concurrent=args.concurrent,
                                             random_state=seed),
            reuse_actors=True, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=label, storage_path=storage, verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    started = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - started
    scores = [r.metrics.get(PRIMARY["classify"]) for r in grid if r.metrics]
    scores = [s for s in scores if isinstance(s, (int, float))]
    return {"best_score": max(scores) if scores else None, "trial_epochs": sum(int(r.metrics.get("epoch", 0))
                                                                               for r in grid if r.metrics),
            "wall_s": wall, "trials": len(grid), "errors": grid.num_errors}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8, help="trials per search")
    parser.add_argument("--epochs", type=int, default=4, help="full budget (epochs) of a trial")
    parser.add_argument("--data", choices=["digits", "fashion-mnist"], default="digits",
                        help="digits (bundled, fast) or data/prepared/classify (run `dvc repro augment` first)")
    parser.add_argument("--train", type=int, default=3000, help="training items (Fashion-MNIST subset)")
    parser.add_argument("--val", type=int, default=1000, help="validation items (Fashion-MNIST subset)")
    parser.add_argument("--families", nargs="+", default=["lenet5", "mobilenet_v2"],
                        help="families searched (the default pair keeps even their largest variants fast)")
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--noop-trials", type=int, default=100)
    parser.add_argument("--noop-trials-no-reuse", type=int, default=10)
    parser.add_argument("--note", default="", help="how this run differs from the default (recorded in the JSON)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/tune_efficiency.json")
    args = parser.parse_args()
    machine = describe()

    import ray
    from ray import tune

    from pipelines.engine import EngineSettings
    from pipelines.params import load_params
    from pipelines.search_space import SearchSpace
    from pipelines.tuner import TrialData, init_ray, make_scheduler, train_trial, trial_base

    params = load_params(ROOT / "params.yaml")
    seed = params.seed
    data_name, train_data, val_data = load_data(args, seed)
    space = SearchSpace.build("classify", args.families, params.search.classify.space,
                               params.search.classify.model_space)
    base = trial_base(params.train.classify, args.epochs)
    points = space.points(base)[:args.samples]
    settings = EngineSettings.from_params(params.model_copy(
        update={"train": params.train.model_copy(update={"num_threads": 1})}))
    init_ray(num_cpus=2)
    print(f"data: {data_name}, {len(train_data)} train / {len(val_data)} val; {args.samples} trials of "
          f"{args.families}, <= {args.epochs} epochs, {args.concurrent} at a time")
    with tempfile.TemporaryDirectory(prefix="tune-bench-") as storage:
        prepared = write_prepared(Path(storage) / "prepared", train_data, val_data)
        trainable = tune.with_parameters(train_trial, task="classify", space=space,
                                         data=TrialData(str(prepared), None, seed), base=base, settings=settings,
                                         policy=params.augment.policy)
        asha = run_search("asha", make_scheduler("asha", args.epochs, 1, params.search.reduction_factor, space),
                          trainable, space, points, args, storage, seed)
        full = run_search("full", None, trainable, space, points, args, storage, seed)
        reuse = overhead(args.noop_trials, True, storage)
        fresh = overhead(args.noop_trials_no_reuse, False, storage)
    ray.shutdown()

    rows = [("ASHA (random trials)", asha), ("full budget (same trials)", full)]
    print(f"\n{'search':<28}{'best val acc':>14}{'trial-epochs':>14}{'wall s':>9}{'errors':>8}")
    for name, r in rows:
        score = "-" if r["best_score"] is None else f"{r['best_score']:.4f}"
        print(f"{name:<28}{score:>14}{r['trial_epochs']:>14}{r['wall_s']:>9.1f}{r['errors']:>8}")
    saved = 1 - asha["trial_epochs"] / max(1, full["trial_epochs"])
    print(f"ASHA trains {saved:.0%} fewer epochs; wall time x{asha['wall_s'] / full['wall_s']:.2f}")
    print(f"\nRay Tune overhead, no-op trainable: {reuse:.3f} s/trial with actor reuse ({args.noop_trials} trials), "
          f"{fresh:.3f} s/trial without ({args.noop_trials_no_reuse} trials)")
    runtime.write_json(args.out, {
        "data": data_name, "train_items": len(train_data), "val_items": len(val_data), "trials": args.samples,
        "max_epochs": args.epochs, "families": args.families, "max_concurrent": args.concurrent,
        "asha": asha, "full_budget": full, "epochs_saved_fraction": saved,
        "overhead_s_per_trial": {"reuse_actors": reuse, "no_reuse": fresh,
                                 "trials": {"reuse_actors": args.noop_trials, "no_reuse": args.noop_trials_no_reuse}},
        "targets": TARGETS, "targets_met": targets_met(asha, full, reuse), "note": args.note,
        "machine": {**machine, "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
