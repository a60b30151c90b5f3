"""Transfer from the classifier: detect and segment started from the trained classify model's trunk vs from scratch.

On the default data (data/prepared/scenes and the classifier at artifacts/models/classify, both made by the default
`dvc repro`), for each task the search's choice (artifacts/search/<task>/best.json, or `--family`) is trained twice
with the same training config, the same seed and the same epochs: once with `pretrained: classify` (the trunk is
the classifier's family, hyperparameters and stride plan, pipelines/transfer.py) and once from scratch (the same
backbone family and hyperparameters, random weights). Both are tested on the test scenes. Prints a table and writes
bench/results/transfer.json (`--out`).

    python bench/transfer.py                                     # detect and segment, the default run's budget
    python bench/transfer.py --epochs 2 --scenes 1000            # a reduced run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's pipelines, not an installed copy

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)
from bench.machine import Parser, describe, positive, result_file, thread_count, whole  # noqa: E402
from models import family as registry_family  # noqa: E402
from pipelines.engine import EngineSettings, evaluate, fit  # noqa: E402
from pipelines.errors import ConvForgeError  # noqa: E402
from pipelines.params import load_params  # noqa: E402
from pipelines.recipe import run_config, run_model  # noqa: E402
from pipelines.tasks import get_task  # noqa: E402
from pipelines.training import read_best  # noqa: E402
from pipelines.transfer import pretrained_source, trunk_hparams  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "transfer.json"
TASKS = ("detect", "segment")
METRIC = {"detect": "map", "segment": "miou"}  # what each task's promotion ranks by


def choice(task: str, family: str | None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The family, hparams and training keys to compare: the search's choice, or `family` at its defaults."""
    best = read_best(ROOT / "artifacts" / "search" / task / "best.json", task)
    if family is None or family == best["family"]:
        return best["family"], best["model"], best["train"]
    return family, {}, best["train"]


def one_run(task: str, start: str, args: argparse.Namespace, params, settings: EngineSettings) -> dict[str, Any]:
    """Train the task's choice from `start` (classify | scratch) and test it; its figures as one row."""
    adapter = get_task(task)
    data_root = ROOT / "data" / "prepared" / adapter.data
    train, val, test = (adapter.load_split(data_root, split) for split in ("train", "val", "test"))
    train = train.subset(args.scenes, params.seed) if args.scenes else train
    family, hparams, searched = choice(task, args.family)
    source = pretrained_source("classify", task, ROOT)
    # Scratch builds the very same network: the classifier's backbone family, hyperparameters and stride plan.
    hparams = {**hparams, **trunk_hparams(registry_family(task, family), source)}
    cfg = run_config(params.train.task(task), args.epochs, **{**searched, "pretrained": None})
    cfg = cfg.updated(freeze=args.freeze if start == "classify" else 0,
                      unfreeze_epoch=args.unfreeze_epoch if start == "classify" else 0)
    full, model, transfer = run_model(task, family, hparams, train, params.seed,
                                      pretrained=source if start == "classify" else None, log=print)
    if start == "classify" and transfer is None:  # run_model fell back to a scratch backbone: nothing to compare
        raise ConvForgeError(f"{task} {family}: the classifier's trunk does not fit it (the line above says why)")
    started = time.perf_counter()
    result = fit(model, task, train, val, cfg, settings, policy=params.augment.policy,
                 log=lambda line: print(f"  {task} {start}: {line}"))
    seconds = time.perf_counter() - started
    metrics = evaluate(result.model, task, test, settings)
    row = {"task": task, "start": start, "family": family, "backbone": full.get("backbone"),
           "epochs": cfg.epochs, "train_items": len(train), "freeze": cfg.freeze, "unfreeze_epoch": cfg.unfreeze_epoch,
           "val": round(result.best_score, 4), "test": round(metrics[METRIC[task]], 4), "metric": METRIC[task],
           "trunk_tensors_loaded": (transfer or {}).get("trunk_matched", 0), "seconds": round(seconds, 1)}
    print(f"{task} {start}: test {METRIC[task]} {row['test']:.4f} (val {row['val']:.4f}) in {row['seconds']:.0f} s")
    return row


def gains(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per task: the classifier-started test score minus the scratch one, and their ratio."""
    out = {}
    for task in {row["task"] for row in rows}:
        by = {row["start"]: row["test"] for row in rows if row["task"] == task}
        out[task] = {"scratch": by["scratch"], "classify": by["classify"],
                     "gain": round(by["classify"] - by["scratch"], 4),
                     "ratio": round(by["classify"] / by["scratch"], 3) if by["scratch"] else None}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--family", default=None, help="one family for every task (default: each search's choice)")
    parser.add_argument("--epochs", type=positive, default=None, help="default: train.<task>.epochs")
    parser.add_argument("--scenes", type=positive, default=None, help="training scenes used (default: all)")
    parser.add_argument("--freeze", type=whole, default=0, help="trunk stages held when started from the classifier")
    parser.add_argument("--unfreeze-epoch", type=whole, default=0, help="from this epoch they fine-tune (0: never)")
    parser.add_argument("--threads", type=thread_count, default=0)
    parser.add_argument("--out", type=result_file, default=RESULTS)
    args = parser.parse_args(argv)
    params = load_params(ROOT / "params.yaml")
    runtime.seed_everything(params.seed, params.deterministic)
    settings = EngineSettings(device="cpu", num_threads=args.threads, seed=params.seed)
    machine = describe()
    try:
        rows = [one_run(task, start, args, params, settings)
                for task in args.tasks for start in ("scratch", "classify")]
    except (ConvForgeError, KeyError) as exc:  # KeyError: an unknown --family, as the registry words it
        sys.exit(f"bench/transfer.py: {exc.args[0] if isinstance(exc, KeyError) else exc}")
    table = gains(rows)
    print(f"\n{'task':<8} {'metric':<6} {'scratch':>8} {'classify':>9} {'gain':>7}")
    for task, row in sorted(table.items()):
        print(f"{task:<8} {METRIC[task]:<6} {row['scratch']:>8.4f} {row['classify']:>9.4f} {row['gain']:>+7.4f}")
    command = "python bench/transfer.py " + " ".join(sys.argv[1:] if argv is None else argv)
    runtime.write_json(args.out, {"command": command.strip(), "runs": rows, "gains": table, "machine": machine})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
