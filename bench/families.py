"""Every classify family at the same budget: test accuracy, params, MACs and CPU latency side by side.

On the prepared default data (data/prepared/classify, made by `dvc repro augment`), each registered classify
family (or those named) is built at its registry defaults and trained as a search trial and the train stage are
(pipelines/recipe.py, pipelines/engine.py) with params.yaml's train.classify settings, on the same seeded
subset of training items for the same epochs; the best epoch on a seeded validation subset is tested on the
test split (or its seeded subset of `--test-items`). Size, MACs and latency (1 image, 1 thread) come from the
registry's model card (models/summary.py), as the search measures its trials. Each family is one MLflow run,
named after it, in experiment `convforge-families` (params: hparams and budget; metrics: accuracies, size,
MACs, latency, train seconds), so the UI's compare view lines them up. The Fashion-MNIST README's
user-submitted results are recorded beside them as published references (other budgets, not measured here).
Prints one line per family per epoch and writes bench/results/families.json.

    python bench/families.py              # every family, 10k items x 2 epochs (21 min at 1 thread on a busy 2-core box)
    python bench/families.py --threads 1 --tracking-uri sqlite:////tmp/families/mlflow.db    # a scratch MLflow store
    python bench/families.py --families lenet5 resnet --train-items 2000 --epochs 1          # a quick look
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's pipelines, not an installed copy

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)
from bench.machine import Parser, describe, load_average, positive, result_file, thread_count  # noqa: E402
from models import families  # noqa: E402
from models._errors import ConvForgeError  # noqa: E402
from models.summary import profile  # noqa: E402
from pipelines import tracking  # noqa: E402
from pipelines.datasets import ClassifyData, load_classify  # noqa: E402
from pipelines.engine import EngineSettings, EpochResult, evaluate, fit  # noqa: E402
from pipelines.params import Params, load_params  # noqa: E402
from pipelines.recipe import run_config, run_model  # noqa: E402
from pipelines.tracking.store import client  # noqa: E402

TASK = "classify"
EXPERIMENT = "convforge-families"
RESULTS = ROOT / "bench" / "results" / "families.json"
PREPARED = ROOT / "data" / "prepared" / TASK
PUBLISHED_SOURCE = "https://github.com/zalandoresearch/fashion-mnist#benchmark (user-submitted)"
# Test accuracy on Fashion-MNIST as submitted to its README's benchmark table: each at its own budget,
# augmentation and size, none measured here.
PUBLISHED = (("WRN-40-4", 0.967), ("DenseNet-BC", 0.954), ("MobileNet", 0.950), ("ResNet-18", 0.949),
             ("GoogLeNet", 0.937), ("VGG-16", 0.935), ("small 2-conv networks", "0.92-0.94"), ("AlexNet", 0.899))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The budget and where the results go."""
    parser = Parser(prog="python bench/families.py", description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=families(TASK), metavar="FAMILY",
                        help=f"families to train (default: every registered one: {', '.join(families(TASK))})")
    parser.add_argument("--train-items", type=positive, default=10_000, help="training items, a seeded subset")
    parser.add_argument("--val-items", type=positive, default=2_000, help="validation items picking the best epoch")
    parser.add_argument("--test-items", type=positive, default=None, help="test items (default: the whole split)")
    parser.add_argument("--epochs", type=positive, default=2)
    parser.add_argument("--threads", type=thread_count, default=0, help="torch threads for training (0 = every core)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: params.yaml's mlflow.tracking_uri; MLFLOW_TRACKING_URI wins)")
    parser.add_argument("--data", type=Path, default=PREPARED, help="prepared classify data (data/prepared/classify)")
    parser.add_argument("--note", default="", help="how this run differs from the default (recorded in the JSON)")
    parser.add_argument("--out", type=result_file, default=RESULTS)
    return parser.parse_args(argv)


def splits(args: argparse.Namespace, seed: int) -> tuple[ClassifyData, ClassifyData, ClassifyData]:
    """The seeded train, validation and test subsets every family shares."""
    return (load_classify(args.data, "train").subset(args.train_items, seed),
            load_classify(args.data, "val").subset(args.val_items, seed),
            load_classify(args.data, "test").subset(args.test_items, seed))


def cpu_profile(model: Any, data: ClassifyData) -> dict[str, Any]:
    """Params, MACs and 1-image latency on one CPU thread, as the search profiles its trials; the training
    thread count is restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        measured = profile(model, TASK, data.in_channels, data.image_size, reps=5)
    finally:
        torch.set_num_threads(threads)
    return {"params": measured["params"], "macs": measured["macs"], "latency_ms": measured["latency_ms_1"]}


def progress(name: str, epochs: int) -> Callable[[EpochResult], None]:
    """The per-epoch callback: one progress line, and the epoch's metrics on the active MLflow run."""
    def on_epoch(result: EpochResult) -> None:
        metrics = result.metrics
        print(f"  {name:<13} epoch {result.epoch}/{epochs}  loss {metrics['train_loss']:.4f}  "
              f"val accuracy {result.score:.4f}  {metrics['images_per_s']:.0f} img/s  {metrics['epoch_s']:.1f} s",
              flush=True)
        tracking.log_metrics(metrics, step=result.epoch)

    return on_epoch


def train_family(name: str, data: tuple[ClassifyData, ...], params: Params, settings: EngineSettings,
                 budget: dict[str, Any], experiment_id: str) -> dict[str, Any]:
    """One family trained, tested and profiled in its own MLflow run named after it; returns its table row."""
    train, val, test = data
    cfg = run_config(params.train.classify, epochs=budget["epochs"])
    with tracking.training_run(experiment_id, None, TASK, name) as run_id:
        client().update_run(run_id, name=name)
        tracking.set_tags({tracking.tags.STAGE: "bench-families"})
        hparams, model, _ = run_model(TASK, name, {}, train, params.seed)
        tracking.log_params({"family": name, "hparams": hparams, "budget": budget, "train": cfg.model_dump()})
        started = time.perf_counter()
        result = fit(model, TASK, train, val, cfg, settings, policy=params.augment.policy,
                     on_epoch=progress(name, cfg.epochs), log=None)
        row = {"family": name, "hparams": hparams, "best_val_accuracy": round(result.best_score, 4),
               "train_s": round(time.perf_counter() - started, 1),
               "test_accuracy": round(evaluate(result.model, TASK, test, settings)["accuracy"], 4),
               **cpu_profile(result.model, train)}
        tracking.log_metrics({k: v for k, v in row.items() if k not in ("family", "hparams")})
    return row


def published() -> list[dict[str, Any]]:
    """The README's user-submitted results, as reference rows."""
    return [{"model": model, "test_accuracy": accuracy} for model, accuracy in PUBLISHED]


def run(args: argparse.Namespace, params: Params, command: str) -> dict[str, Any]:
    """Every chosen family at the same budget, tracked in MLflow; the result JSON's content."""
    machine = describe()
    threads = runtime.set_threads(args.threads)
    data = splits(args, params.seed)
    budget = {"train_items": len(data[0]), "val_items": len(data[1]), "test_items": len(data[2]),
              "epochs": args.epochs, "threads": threads}
    settings = replace(EngineSettings.from_params(params), num_threads=threads)
    uri = tracking.use_store(tracking.resolve_uri(args.tracking_uri)) if args.tracking_uri \
        else tracking.configure(params.mlflow)
    experiment_id = tracking.ensure_experiment(EXPERIMENT)
    names = args.families or families(TASK)
    print(f"{len(names)} classify families, {budget['train_items']:,} training items x {args.epochs} epoch(s), "
          f"{threads} thread(s); MLflow experiment {EXPERIMENT} at {uri}", flush=True)
    rows = [train_family(name, data, params, settings, budget, experiment_id) for name in names]
    return {"bench": "families", "command": command,
            "note": args.note, "data": f"{params.data.dataset} ({args.data.name} prepared splits)",
            "budget": budget, "train": run_config(params.train.classify, epochs=args.epochs).model_dump(),
            "experiment": EXPERIMENT, "rows": rows, "published": published(), "published_source": PUBLISHED_SOURCE,
            "machine": {**machine, "load_avg_at_end": load_average()}}


def print_table(result: dict[str, Any]) -> None:
    """The measured rows, best test accuracy first."""
    print(f"\n{'family':<14}{'test acc':>9}{'val acc':>9}{'params':>11}{'MMACs':>9}{'ms/1':>8}{'train s':>9}")
    for row in sorted(result["rows"], key=lambda r: -r["test_accuracy"]):
        print(f"{row['family']:<14}{row['test_accuracy']:>9.4f}{row['best_val_accuracy']:>9.4f}{row['params']:>11,}"
              f"{row['macs'] / 1e6:>9.2f}{row['latency_ms']:>8.2f}{row['train_s']:>9.1f}")


def main(argv: list[str] | None = None) -> None:
    """Train every family, print the table and write the JSON; bad input is one line on stderr."""
    args = parse_args(argv)
    try:
        command = shlex.join(["python", "bench/families.py", *(sys.argv[1:] if argv is None else argv)])
        result = run(args, load_params(ROOT / "params.yaml"), command)
    except ConvForgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print_table(result)
    runtime.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
