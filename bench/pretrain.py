"""Autoencoder pretraining as a backbone source when labels are few: classify accuracy from scratch vs from the encoder.

On the default data (data/prepared/classify, made by `dvc repro augment`): a denoising autoencoder
(models/autoencoder.py, encoder = the classifier family's trunk) is trained on the training images without their
labels, corrupted as params.yaml's `corruption` says; then, for each seed, a classifier of that family is trained
on `--label-fraction` of the training items (a seeded, class-stratified draw) once from scratch and once with
`pretrained:` the saved autoencoder (its whole trunk loaded, models/_checkpoint.py), with the same training
config, and tested on the test split. Prints a table and writes bench/results/pretrain.json (`--out`).

    python bench/pretrain.py                                     # 10% of the labels, 3 seeds
    python bench/pretrain.py --items 20000 --ae-epochs 2 --epochs 4 --test-items 5000   # a reduced run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's pipelines, not an installed copy

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)
from bench.machine import Parser, describe, fraction, positive, result_file, thread_count  # noqa: E402
from models import _checkpoint as checkpoint  # noqa: E402
from models._registry import BACKBONE_TASK, RECONSTRUCT_TASK, build, families  # noqa: E402
from pipelines.datasets import load_classify  # noqa: E402
from pipelines.engine import EngineSettings, evaluate, fit  # noqa: E402
from pipelines.errors import ConvForgeError  # noqa: E402
from pipelines.params import load_params  # noqa: E402
from pipelines.reconstruction import load_corrupted  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "pretrain.json"


def labelled_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of `fraction` of the items of each class (at least one), drawn with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        count = max(1, round(fraction * len(members)))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen).sort().values


def train_autoencoder(args: argparse.Namespace, params, settings: EngineSettings, folder: Path) -> dict:
    """The denoising autoencoder on the (unlabelled) training images, saved as the train stage saves a model."""
    root = ROOT / "data" / "prepared" / "classify"
    train = load_corrupted(root, "train", params.corruption).subset(args.items, params.seed)
    val = load_corrupted(root, "val", params.corruption).subset(args.test_items, params.seed)
    hparams = {"encoder": args.family, "encoder_hparams": {}, "width": 8}
    torch.manual_seed(params.seed)
    model = build(RECONSTRUCT_TASK, "autoencoder", len(train.classes), train.in_channels, train.image_size, **hparams)
    cfg = params.train.task(RECONSTRUCT_TASK).updated(epochs=args.ae_epochs)
    started = time.perf_counter()
    result = fit(model, RECONSTRUCT_TASK, train, val, cfg, settings, log=None)
    metrics = evaluate(result.model, RECONSTRUCT_TASK, val, settings)
    checkpoint.save(result.model, {"task": RECONSTRUCT_TASK, "family": "autoencoder", "hparams": hparams,
                                   "num_classes": len(train.classes), "in_channels": train.in_channels,
                                   "image_size": train.image_size}, folder)
    return {"items": len(train), "epochs": args.ae_epochs, "seconds": round(time.perf_counter() - started, 1),
            "val_psnr": round(metrics["psnr"], 3), "val_psnr_gain": round(metrics["psnr_gain"], 3)}


def classify_run(args: argparse.Namespace, params, settings: EngineSettings, seed: int, pretrained: str | None) -> dict:
    """Test accuracy of the classifier trained on the labelled fraction, from scratch or from the encoder."""
    root = ROOT / "data" / "prepared" / "classify"
    train, val, test = (load_classify(root, split) for split in ("train", "val", "test"))
    train = train.subset(args.items, params.seed)
    idx = labelled_subset(train.labels, args.label_fraction, seed)
    from dataclasses import replace

    labelled = replace(train, images=train.images[idx], labels=train.labels[idx], is_copy=None)
    torch.manual_seed(seed)
    model = build(BACKBONE_TASK, args.family, len(train.classes), train.in_channels, train.image_size,
                  **({"pretrained": pretrained} if pretrained else {}))
    cfg = params.train.task(BACKBONE_TASK).updated(epochs=args.epochs, warmup_epochs=0, pretrained=None)
    started = time.perf_counter()
    result = fit(model, BACKBONE_TASK, labelled, val.subset(args.test_items, seed), cfg,
                 EngineSettings(**{**vars(settings), "seed": seed}), policy=params.augment.policy, log=None)
    accuracy = evaluate(result.model, BACKBONE_TASK, test.subset(args.test_items, 0), settings)["accuracy"]
    return {"seed": seed, "start": "encoder" if pretrained else "scratch", "labelled_items": len(idx),
            "test_accuracy": round(accuracy, 4), "seconds": round(time.perf_counter() - started, 1)}


def summary(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and sd of the test accuracy per start."""
    out = {}
    for start in ("scratch", "encoder"):
        values = [run["test_accuracy"] for run in runs if run["start"] == start]
        out[start] = {"mean": round(statistics.mean(values), 4),
                      "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="resnet", choices=families(BACKBONE_TASK),
                        help="the classifier family (its trunk is the encoder)")
    parser.add_argument("--label-fraction", type=fraction, default=0.1,
                        help="share of the training items with their labels (each class's share, at least one item)")
    parser.add_argument("--seeds", type=positive, default=3)
    parser.add_argument("--items", type=positive, default=None, help="training items used (default: all)")
    parser.add_argument("--ae-epochs", type=positive, default=3)
    parser.add_argument("--epochs", type=positive, default=8, help="classifier epochs on the labelled items")
    parser.add_argument("--test-items", type=positive, default=None, help="val/test items scored (default: all)")
    parser.add_argument("--threads", type=thread_count, default=0)
    parser.add_argument("--out", type=result_file, default=RESULTS)
    args = parser.parse_args(argv)
    machine = describe()
    params = load_params(ROOT / "params.yaml")
    settings = EngineSettings(device="cpu", num_threads=args.threads, seed=params.seed)
    try:
        with tempfile.TemporaryDirectory() as work:
            encoder = train_autoencoder(args, params, settings, Path(work) / "autoencoder")
            print(f"autoencoder: {encoder}")
            runs = []
            for seed in range(args.seeds):
                for pretrained in (None, str(Path(work) / "autoencoder")):
                    runs.append(classify_run(args, params, settings, seed, pretrained))
                    print(runs[-1])
    except ConvForgeError as exc:
        sys.exit(f"bench/pretrain.py: {exc}")
    table = summary(runs)
    print(f"\n{args.family}, {args.label_fraction:.0%} of the labels, {args.seeds} seeds: test accuracy")
    print(f"{'start':<9} {'mean':>7} {'sd':>7}")
    for start, row in table.items():
        print(f"{start:<9} {row['mean']:>7.4f} {row['sd']:>7.4f}")
    command = "python bench/pretrain.py " + " ".join(sys.argv[1:] if argv is None else argv)
    runtime.write_json(args.out, {"command": command, "family": args.family, "label_fraction": args.label_fraction,
                                 "autoencoder": encoder, "runs": runs, "summary": table,
                                 "corruption": params.corruption.model_dump(), "machine": machine})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
