"""RoIAlign while training on the CPU: models/_roi_align.py's matrix products against torchvision's op.

Two measurements, each forward + backward, best of `--repeats`, with `--threads` torch threads:
- the op alone: 8 images x 32 RoIs (7 x 7 bins, 2 x 2 samples each) on C-channel maps of several sizes,
  with the path SeparableRoIAlign takes at each size (torchvision's op above MAX_MAP_PIXELS);
- a Faster R-CNN training step (registry defaults: ResNet trunk, 32-channel FPN) on 64 px scenes of 1-3
  boxes in batches of 16, as the default pipeline trains it, with its RoI pools as they are and swapped for
  torchvision's MultiScaleRoIAlign. Target: >= 1.5x images per second.

    .venv/bin/python bench/roi_align.py     # ~2 min on 2 cores
Writes bench/results/roi_align.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)
from bench.machine import Parser, describe, load_average, positive, result_file, thread_count  # noqa: E402

TARGET = 1.5
MAP_SIZES = (8, 16, 32, 64, 96, 160)
IMAGES, ROIS_PER_IMAGE, CANVAS, BATCH = 8, 32, 64, 16


def best_seconds(step, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `step`, after one untimed call."""
    step()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return best


def op_rows(channels: int, repeats: int) -> list[dict]:
    """Forward + backward ms of both ops at each map size (stride 4: boxes on a 4x larger image)."""
    import torch
    from torchvision.ops import roi_align

    from models._roi_align import MAX_MAP_PIXELS, separable_roi_align

    rows = []
    for size in MAP_SIZES:
        generator = torch.Generator().manual_seed(size)
        features = torch.randn(IMAGES, channels, size, size, generator=generator).to(memory_format=torch.channels_last)
        image = 4 * size
        xy = torch.rand(IMAGES * ROIS_PER_IMAGE, 2, generator=generator) * image * 0.8
        wh = torch.rand(IMAGES * ROIS_PER_IMAGE, 2, generator=generator) * image * 0.3 + 1
        index = torch.arange(IMAGES).repeat_interleave(ROIS_PER_IMAGE).float()
        rois = torch.cat([index[:, None], xy, (xy + wh).clamp(max=image)], 1)
        grad = torch.randn(len(rois), channels, 7, 7, generator=generator)

        def step(pool):
            x = features.detach().requires_grad_(True)
            return lambda: pool(x).backward(grad)

        torchvision_s = best_seconds(step(lambda x: roi_align(x, rois, (7, 7), 0.25, 2, False)), repeats)
        separable_s = best_seconds(step(lambda x: separable_roi_align(x, rois, (7, 7), 0.25, 2)), repeats)
        rows.append({"map": f"{size}x{size}", "channels": channels, "rois": len(rois),
                     "torchvision_ms": round(torchvision_s * 1e3, 2), "separable_ms": round(separable_s * 1e3, 2),
                     "speedup": round(torchvision_s / separable_s, 2),
                     "used": "matrix products" if size * size <= MAX_MAP_PIXELS else "torchvision"})
        print(f"op, {size}x{size} map, {channels} channels, {len(rois)} RoIs: torchvision {torchvision_s * 1e3:.1f} "
              f"ms, separable {separable_s * 1e3:.1f} ms ({torchvision_s / separable_s:.2f}x)", flush=True)
    return rows


def scenes(count: int, seed: int):
    """`count` 64 px grey scenes with 1-3 boxes of 12-32 px each, labels 1-10."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(count):
        k = int(torch.randint(1, 4, (1,), generator=generator))
        xy = torch.rand(k, 2, generator=generator) * (CANVAS - 32)
        boxes = torch.cat([xy, xy + 12 + torch.rand(k, 2, generator=generator) * 20], 1)
        images.append(torch.rand(1, CANVAS, CANVAS, generator=generator))
        targets.append({"boxes": boxes, "labels": torch.randint(1, 11, (k,), generator=generator)})
    return images, targets


def detector_rate(swap: bool, steps: int, repeats: int) -> float:
    """Faster R-CNN training images per second, with its RoI pools or torchvision's (`swap`)."""
    import torch
    from torchvision.ops import MultiScaleRoIAlign

    from models import build

    torch.manual_seed(0)
    model = build("detect", "faster_rcnn", 10, 1, CANVAS).train()
    if swap:
        pool = model.roi_heads.box_roi_pool
        model.roi_heads.box_roi_pool = MultiScaleRoIAlign(pool.featmap_names, pool.output_size, pool.sampling_ratio)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [scenes(BATCH, seed) for seed in range(steps)]

    def epoch():
        for images, targets in batches:
            loss = sum(model(images, targets).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return steps * BATCH / best_seconds(epoch, repeats)


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=thread_count, default=0, help="torch threads (0: every core)")
    parser.add_argument("--channels", type=positive, default=32)
    parser.add_argument("--steps", type=positive, default=8, help="training steps per timed pass")
    parser.add_argument("--repeats", type=positive, default=3)
    parser.add_argument("--out", type=result_file, default=ROOT / "bench" / "results" / "roi_align.json")
    args = parser.parse_args()
    runtime.set_threads(args.threads)
    machine = describe()
    ops = op_rows(args.channels, args.repeats)
    rates = {}
    for label, swap in (("torchvision", True), ("separable", False)):
        rates[label] = detector_rate(swap, args.steps, args.repeats)
        print(f"Faster R-CNN training, {label} RoIAlign: {rates[label]:.1f} img/s", flush=True)
    speedup = rates["separable"] / rates["torchvision"]
    import torch

    machine.update(threads=torch.get_num_threads(), load_avg_at_end=load_average())
    result = {"command": "python bench/roi_align.py" + (f" --threads {args.threads}" if args.threads else ""),
              "machine": machine, "ops": ops,
              "detector": {"family": "faster_rcnn", "canvas": CANVAS, "batch": BATCH, "steps": args.steps,
                           "torchvision_img_per_s": round(rates["torchvision"], 1),
                           "separable_img_per_s": round(rates["separable"], 1), "speedup": round(speedup, 2),
                           "target": TARGET, "met": speedup >= TARGET}}
    runtime.write_json(args.out, result)
    print(f"Faster R-CNN training {speedup:.2f}x (target >= {TARGET}x); wrote {args.out}")


if __name__ == "__main__":
    main()
