"""What `deterministic: true` costs a CPU training step, and what skipping torch's fill of new tensors saves.

Under `torch.use_deterministic_algorithms(True)` torch also fills every new tensor with NaN
(`torch.utils.deterministic.fill_uninitialized_memory`, on by default) so that a read of memory
no op wrote shows. ConvForge's deterministic runs turn that fill off (pipelines/runtime.py; the
engine's tests train each default family with it on and off to the same bits). Three settings:
- off: torch's fastest kernels, not deterministic (params `deterministic: false`);
- kernels + fill: deterministic kernels as torch sets them up by default;
- kernels: deterministic kernels without the fill, what a ConvForge run uses.
Each is timed on the default run's models and batches, through the tasks' own losses: the ResNet-10/16
classifier on 28 px items (batch 64), the U-Net on its trunk on 64 px scenes (batch 32, cross-entropy
+ Dice) and Faster R-CNN on its trunk (batch 16). Images per second of training steps (forward,
backward, AdamW), best of `--repeats` passes with the settings interleaved, `--threads` torch threads.

    .venv/bin/python bench/determinism.py     # ~1 min on 2 cores
Writes bench/results/determinism.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)
from bench.machine import Parser, describe, load_average, positive, result_file, thread_count  # noqa: E402
from bench.roi_align import scenes  # noqa: E402

SETTINGS = {"off": (False, False), "kernels + fill": (True, True), "kernels": (True, False)}
TRUNK = {"depth": 10, "width": 16}  # the default run's classifier, whose trunk detect and segment start from
# task: (family, hparams, image size, batch, steps per pass)
MODELS = {
    "classify": ("resnet", TRUNK, 28, 64, 32),
    "segment": ("unet", {"encoder": "resnet", "encoder_hparams": {**TRUNK, "image_size": 28}}, 64, 32, 6),
    "detect": ("faster_rcnn", {"backbone_hparams": {**TRUNK, "image_size": 28}}, 64, 16, 6),
}


def box_masks(boxes, size: int):
    """uint8 masks [k, size, size], each its box filled."""
    import torch

    grid = torch.arange(size) + 0.5
    inside_y = (grid[None] >= boxes[:, 1:2]) & (grid[None] < boxes[:, 3:4])
    inside_x = (grid[None] >= boxes[:, 0:1]) & (grid[None] < boxes[:, 2:3])
    return (inside_y[:, :, None] & inside_x[:, None, :]).to(torch.uint8)


def batches(task: str, size: int, batch: int, steps: int):
    """`steps` batches of the task's (images, targets), fixed by the seed."""
    import torch

    generator = torch.Generator().manual_seed(0)
    out = []
    for step in range(steps):
        if task == "detect":  # the adapter's targets: labels 0..9 and instance masks (the boxes filled)
            images, targets = scenes(batch, step)
            out.append((torch.stack(images), [{**t, "labels": t["labels"] - 1, "masks": box_masks(t["boxes"], size)}
                                              for t in targets]))
            continue
        images = torch.randn(batch, 1, size, size, generator=generator)
        shape = (batch,) if task == "classify" else (batch, size, size)
        out.append((images, torch.randint(0, 10 if task == "classify" else 11, shape, generator=generator)))
    return out


def step_rates(task: str, settings: dict[str, tuple[Callable[[], None], Any]], repeats: int, family: str | None = None,
               hparams: dict | None = None, batch: int | None = None, steps: int | None = None) -> dict[str, float]:
    """Training images per second of `task`'s default model (or `family` with `hparams`, default {}) under each
    setting: a label -> (what it sets before its passes, the autocast dtype of the forward pass or None). Best of
    `repeats` passes, the settings interleaved so that a slow spell of a shared machine hits every one alike."""
    import torch

    from models import build
    from pipelines.params import load_params
    from pipelines.tasks import get_task

    default_family, default_hparams, size, default_batch, default_steps = MODELS[task]
    if family is None:  # the default model's hyperparameters go with its family only
        family, hparams = default_family, default_hparams
    hparams, batch, steps = hparams or {}, batch or default_batch, steps or default_steps
    adapter, cfg = get_task(task), load_params(ROOT / "params.yaml").train.task(task)
    torch.manual_seed(0)
    model = build(task, family, 10, 1, size, **hparams).train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = [(images.contiguous(memory_format=torch.channels_last), targets)
            for images, targets in batches(task, size, batch, steps)]

    def passes(dtype) -> None:
        for images, targets in data:
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = adapter.loss(model, images, targets, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    for apply, dtype in settings.values():  # warm-up: first-call allocations and kernel choices of each
        apply()
        passes(dtype)
    best = dict.fromkeys(settings, 0.0)
    for _ in range(repeats):
        for label, (apply, dtype) in settings.items():
            apply()
            started = time.perf_counter()
            passes(dtype)
            best[label] = max(best[label], steps * batch / (time.perf_counter() - started))
    for label, rate in best.items():
        print(f"{task} ({family}, {size} px, batch {batch}), {label}: {rate:.1f} img/s", flush=True)
    return best


def rates(task: str, repeats: int) -> dict[str, float]:
    """Training images per second of `task`'s default model under each of SETTINGS."""
    import torch

    def determinism(deterministic: bool, fill: bool) -> Callable[[], None]:
        def apply() -> None:
            torch.use_deterministic_algorithms(deterministic, warn_only=True)
            torch.utils.deterministic.fill_uninitialized_memory = fill
        return apply

    return step_rates(task, {label: (determinism(*flags), None) for label, flags in SETTINGS.items()}, repeats)


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=thread_count, default=0, help="torch threads (0: every core)")
    parser.add_argument("--repeats", type=positive, default=8)
    parser.add_argument("--out", type=result_file, default=ROOT / "bench" / "results" / "determinism.json")
    args = parser.parse_args()
    runtime.set_threads(args.threads)
    machine = describe()
    rows = []
    for task, (family, _, size, batch, _) in MODELS.items():
        rate = rates(task, args.repeats)
        rows.append({"task": task, "family": family, "image_size": size, "batch": batch,
                     **{f"{label}_img_per_s": round(value, 1) for label, value in rate.items()},
                     "no_fill_speedup": round(rate["kernels"] / rate["kernels + fill"], 2),
                     "determinism_cost": round(1 - rate["kernels"] / rate["off"], 3)})
    import torch

    machine.update(threads=torch.get_num_threads(), load_avg_at_end=load_average())
    result = {"command": "python bench/determinism.py" + (f" --threads {args.threads}" if args.threads else ""),
              "machine": machine, "repeats": args.repeats, "rows": rows}
    runtime.write_json(args.out, result)
    speedups = ", ".join(f"{r['task']} {r['no_fill_speedup']:.2f}x" for r in rows)
    print(f"wrote {args.out.name}; without the fill: {speedups}")


if __name__ == "__main__":
    main()
