"""Model card of the registry: parameters, MACs and CPU latency of every family at its defaults.

    python -m models.summary [--task classify] [--family resnet] [--json PATH] [--threads N] [--reps 3]

MACs are counted by torch.utils.flop_counter (MACs = FLOPs / 2; ops it does not know, such as
NMS or RoIAlign, count as zero). Latency is the median over a few runs after a warm-up, under
torch.inference_mode, with the current torch thread count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models import _registry
from models._registry import build, families, family, tasks

NUM_CLASSES = 10


def default_input(task: str) -> tuple[int, int]:
    """(in_channels, image_size) a task's families are profiled at: the project's default data
    (Fashion-MNIST items for classification, its 64 px scenes for detection and segmentation)."""
    return _registry.PROFILE_INPUT[task]


def _call(model: nn.Module, in_channels: int, image_size: int, batch: int) -> Callable[[], Any]:
    """A closure running `model` on a seeded random batch in its input form (a list of images for
    torchvision's detection models, a batch tensor otherwise)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, in_channels, image_size, image_size, generator=generator)
    if isinstance(getattr(model, "transform", None), GeneralizedRCNNTransform):
        as_list = list(images)
        return lambda: model(as_list)
    return lambda: model(images)


def count_macs(model: nn.Module, in_channels: int, image_size: int) -> int:
    """Multiply-accumulates of one eval-mode forward pass of one image."""
    run = _call(model, in_channels, image_size, 1)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        run()
    return counter.get_total_flops() // 2


def latency_ms(model: nn.Module, in_channels: int, image_size: int, batch: int, reps: int = 3) -> float:
    """Median wall time (ms) of an eval-mode forward pass of `batch` images, after one warm-up."""
    run = _call(model, in_channels, image_size, batch)
    times = []
    with torch.inference_mode():
        run()
        for _ in range(reps):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def profile(model: nn.Module, task: str, in_channels: int, image_size: int, reps: int = 3) -> dict[str, Any]:
    """`params`, `macs` (1 image) and CPU `latency_ms_1` / `latency_ms_64` of `model` (left in eval mode on CPU).

    `task` names the model's task for callers' records; the input form comes from the model itself."""
    model = model.cpu().eval()
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "macs": count_macs(model, in_channels, image_size),
        "latency_ms_1": round(latency_ms(model, in_channels, image_size, 1, reps), 3),
        "latency_ms_64": round(latency_ms(model, in_channels, image_size, 64, max(1, reps - 1)), 3),
    }


def summarize(tasks: list[str], only: list[str] | None = None, reps: int = 3,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One profile row per family of each task (or those in `only`), at its defaults and the task's default input."""
    rows = []
    for task in tasks:
        in_channels, image_size = default_input(task)
        for name in families(task):
            if only and name not in only:
                continue
            torch.manual_seed(0)
            model = build(task, name, NUM_CLASSES, in_channels, image_size)
            row = {"task": task, "family": name, "input": f"{in_channels}x{image_size}x{image_size}",
                   **profile(model, task, in_channels, image_size, reps), "paper": family(task, name).paper}
            log(f"  profiled {task}/{name}")
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width table, one block per task."""
    lines = []
    for task in dict.fromkeys(row["task"] for row in rows):
        mine = [row for row in rows if row["task"] == task]
        lines += ["", f"{task} (input {mine[0]['input']}, {NUM_CLASSES} classes, {torch.get_num_threads()} thread(s))",
                  f"{'family':<14}{'params':>12}{'MMACs':>10}{'ms/1':>9}{'ms/64':>10}  paper",
                  "-" * 80]
        for row in mine:
            lines.append(f"{row['family']:<14}{row['params']:>12,}{row['macs'] / 1e6:>10.1f}"
                         f"{row['latency_ms_1']:>9.2f}{row['latency_ms_64']:>10.1f}  {row['paper']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the model card; optionally write it as JSON."""
    from models._errors import ConvForgeError
    from models._files import write_json

    parser = argparse.ArgumentParser(prog="python -m models.summary", description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=tasks(), action="append", help="only this task (repeatable)")
    parser.add_argument("--family", action="append", help="only this family (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per latency (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = every core)")
    args = parser.parse_args(argv)
    try:
        torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
        print("profiling every family at its defaults...", file=sys.stderr)
        rows = summarize(args.task or tasks(), args.family, max(1, args.reps),
                         log=lambda m: print(m, file=sys.stderr))
        if not rows:
            raise ConvForgeError(f"no family {args.family} in task(s) {args.task or tasks()}")
        print(table(rows))
        if args.json:
            write_json(args.json, {"threads": torch.get_num_threads(), "rows": rows})
    except ConvForgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
