"""What bf16 autocast does to a CPU training step: models in float32 and in bf16 (`train.amp: bf16`).

`train.amp: auto` trains in float32 on the CPU; `bf16` is the user's choice, fast only on CPUs with bf16
instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16; `pipelines.runtime._cpu_has_bf16` reads them), where
oneDNN does not emulate it. Validation, evaluate and serving stay in float32 either way. Two sets of rows:
- the default run's models as it trains them, `--threads` torch threads: the ResNet-10/16 classifier on
  28 px items (batch 128), the U-Net on its trunk on 64 px scenes (batch 32, cross-entropy + Dice) and
  Faster R-CNN on its trunk (batch 16), through the tasks' own losses;
- each classify family as a search trial trains it on 2 cores (one thread, batch 64, 28 px): the default
  search's four and the depthwise-separable and other CPU-sized ones.
Deterministic kernels and channels_last throughout. Images per second of training steps (forward,
backward, AdamW), best of `--repeats` passes with the two settings interleaved.

    .venv/bin/python bench/cpu_amp.py     # ~1 min on 2 cores
Writes bench/results/cpu_amp.json.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)
from bench.determinism import MODELS, step_rates  # noqa: E402
from bench.machine import Parser, describe, load_average, positive, result_file, thread_count  # noqa: E402

BATCH = {"classify": 128}  # the default run's batch where it differs from bench/determinism.py's
# family: hparams (the default search's model_space picks for its four; registry defaults for the others)
FAMILIES = {"lenet5": {}, "resnet": {"depth": 10, "width": 16}, "vgg": {"depth": 11, "width": 8},
            "mobilenet_v2": {"width_mult": 0.5, "depth_mult": 0.5}, "efficientnet": {}, "convnext": {},
            "squeezenet": {}}


def row(task: str, family: str, size: int, batch: int, repeats: int, hparams: dict | None = None,
        steps: int | None = None) -> dict:
    """One model's training images per second in float32 and under bf16 autocast, at torch's current threads."""
    import torch

    # as a deterministic ConvForge run on the CPU trains
    as_a_run = functools.partial(runtime.apply_determinism, runtime.resolve("cpu", "off", True, True, runtime.probe()))
    rate = step_rates(task, {"float32": (as_a_run, None), "bf16": (as_a_run, torch.bfloat16)}, repeats,
                      family, hparams, batch, steps)
    return {"task": task, "family": family, "image_size": size, "batch": batch, "threads": torch.get_num_threads(),
            "float32_img_per_s": round(rate["float32"], 1), "bf16_img_per_s": round(rate["bf16"], 1),
            "speedup": round(rate["bf16"] / rate["float32"], 2)}


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=thread_count, default=0, help="torch threads (0: every core)")
    parser.add_argument("--repeats", type=positive, default=6)
    parser.add_argument("--out", type=result_file, default=ROOT / "bench" / "results" / "cpu_amp.json")
    args = parser.parse_args()
    threads = runtime.set_threads(args.threads)
    machine = describe()
    native = runtime.probe().cpu_bf16
    rows = [row(task, family, size, BATCH.get(task, batch), args.repeats, hparams)
            for task, (family, hparams, size, batch, _) in MODELS.items()]
    runtime.set_threads(1)  # a search trial's share of 2 cores
    families = [row("classify", family, 28, 64, args.repeats, hparams, 12) for family, hparams in FAMILIES.items()]
    machine.update(threads=threads, native_bf16=native, load_avg_at_end=load_average())
    result = {"command": "python bench/cpu_amp.py" + (f" --threads {args.threads}" if args.threads else ""),
              "machine": machine, "repeats": args.repeats, "rows": rows, "families": families}
    runtime.write_json(args.out, result)
    speedups = ", ".join(f"{r['family']} {r['speedup']:.2f}x" for r in rows + families)
    print(f"wrote {args.out.name}; bf16 against float32: {speedups} (native bf16: {'yes' if native else 'no'})")


if __name__ == "__main__":
    main()
