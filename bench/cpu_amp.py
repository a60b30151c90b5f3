"""What bf16 autocast buys a CPU training step: the default run's models in float32 and in bf16.

`train.amp: auto` trains in bf16 on CPUs with bf16 instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16;
`pipelines.runtime._cpu_has_bf16` reads them) and in float32 elsewhere, where oneDNN would emulate bf16.
Validation, evaluate and serving stay in float32. Each model is timed as the default run trains it: the
ResNet-10/16 classifier on 28 px items (batch 128), the U-Net on its trunk on 64 px scenes (batch 32,
cross-entropy + Dice) and Faster R-CNN on its trunk (batch 16), through the tasks' own losses, with
deterministic kernels and channels_last. Images per second of training steps (forward, backward, AdamW),
best of `--repeats` passes with the two settings interleaved, `--threads` torch threads.

    .venv/bin/python bench/cpu_amp.py     # ~1 min on 2 cores
Writes bench/results/cpu_amp.json.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)
from bench.determinism import MODELS, batches  # noqa: E402
from bench.machine import Parser, describe, positive, thread_count  # noqa: E402

BATCH = {"classify": 128}  # the default run's batch where it differs from bench/determinism.py's


def rates(task: str, repeats: int) -> dict[str, float]:
    """Training images per second of `task`'s default model in float32 and under bf16 autocast."""
    import torch

    from models import build
    from pipelines.params import load_params
    from pipelines.tasks import get_task

    family, hparams, size, batch, steps = MODELS[task]
    batch = BATCH.get(task, batch)
    adapter, cfg = get_task(task), load_params(ROOT / "params.yaml").train.task(task)
    torch.manual_seed(0)
    model = build(task, family, 10, 1, size, **hparams).train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = [(images.contiguous(memory_format=torch.channels_last), targets)
            for images, targets in batches(task, size, batch, steps)]
    dtypes = {"float32": None, "bf16": torch.bfloat16}

    def passes(dtype) -> None:
        for images, targets in data:
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = adapter.loss(model, images, targets, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    for dtype in dtypes.values():  # warm-up: first-call allocations and kernel choices of each
        passes(dtype)
    best = dict.fromkeys(dtypes, 0.0)
    for _ in range(repeats):  # interleaved: a slow spell of a shared machine hits both alike
        for label, dtype in dtypes.items():
            started = time.perf_counter()
            passes(dtype)
            best[label] = max(best[label], steps * batch / (time.perf_counter() - started))
    for label, rate in best.items():
        print(f"{task} ({family}, {size} px, batch {batch}), {label}: {rate:.1f} img/s", flush=True)
    return best


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=thread_count, default=0, help="torch threads (0: every core)")
    parser.add_argument("--repeats", type=positive, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_amp.json")
    args = parser.parse_args()
    runtime.set_threads(args.threads)
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)  # as a ConvForge run on the CPU trains
    torch.utils.deterministic.fill_uninitialized_memory = runtime.FILL_UNINITIALIZED_MEMORY
    machine = describe()
    native = runtime.probe().cpu_bf16
    rows = []
    for task, (family, _, size, batch, _) in MODELS.items():
        rate = rates(task, args.repeats)
        rows.append({"task": task, "family": family, "image_size": size, "batch": BATCH.get(task, batch),
                     "float32_img_per_s": round(rate["float32"], 1), "bf16_img_per_s": round(rate["bf16"], 1),
                     "speedup": round(rate["bf16"] / rate["float32"], 2)})
    machine.update(threads=torch.get_num_threads(), native_bf16=native,
                   load_avg_at_end=[round(x, 2) for x in os.getloadavg()])
    result = {"command": "python bench/cpu_amp.py" + (f" --threads {args.threads}" if args.threads else ""),
              "machine": machine, "repeats": args.repeats, "amp_auto": "bf16" if native else "off", "rows": rows}
    runtime.write_json(args.out, result)
    speedups = ", ".join(f"{r['task']} {r['speedup']:.2f}x" for r in rows)
    print(f"wrote {args.out.name}; bf16 against float32: {speedups} (native bf16: {'yes' if native else 'no'})")


if __name__ == "__main__":
    main()
