"""Classify augmentation: torchvision's crop and flip one item at a time against `CropFlip`'s whole batches.

The default policy (`augment.policy`: crop with padding, horizontal flip) is what every classify and regress
run augments with. Both arms draw the same numbers in the same order, so they give the same items and the same
trained weights; the bench checks both and times:
- augmentation alone: items per second on Fashion-MNIST training items at three strengths (0.63, the searched
  winner's `aug_strength`; 1, the policy as written; 1.5, the top of the search space), 1 torch thread;
- one training epoch of the searched winner (ResNet-10/16, batch 64) through `pipelines.engine.fit`, with the
  per-item path (torchvision's steps, the path every other policy takes) against the batched one.
Best of `--repeats` interleaved passes. Target: augmentation alone >= 5x.

    .venv/bin/python bench/augment.py     # ~2 min
Writes bench/results/augment.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)
from bench.machine import Parser, describe, load_average, positive, result_file, thread_count  # noqa: E402

STRENGTHS = (0.63, 1.0, 1.5)
TARGET = 5.0
WINNER = {"depth": 10, "width": 16, "dropout": 0.45}  # the default run's searched classifier


def augmentation_rows(images, policies: dict, repeats: int, batch: int) -> list[dict]:
    """Per strength: items/s of torchvision's steps item by item and of CropFlip's batches, and whether they agree."""
    import torch

    rows = []
    for strength, crop_flip in policies.items():
        best = {"torchvision": float("inf"), "batched": float("inf")}
        outputs = {}
        for _ in range(repeats):
            for arm in best:
                torch.manual_seed(0)
                started = time.perf_counter()
                if arm == "torchvision":
                    out = torch.stack([crop_flip.steps(image) for image in images])
                else:
                    out = torch.cat([crop_flip.batch(images[i:i + batch]) for i in range(0, len(images), batch)])
                best[arm] = min(best[arm], time.perf_counter() - started)
                outputs[arm] = (out, torch.rand(1))
        identical = all(torch.equal(a, b) for a, b in zip(outputs["torchvision"], outputs["batched"]))
        rows.append({"strength": strength, "policy": repr(crop_flip.steps).replace("\n", " "),
                     "torchvision_items_per_s": len(images) / best["torchvision"],
                     "batched_items_per_s": len(images) / best["batched"],
                     "speedup": best["torchvision"] / best["batched"], "identical": identical})
        print(f"strength {strength}: torchvision {rows[-1]['torchvision_items_per_s']:,.0f} items/s, batched "
              f"{rows[-1]['batched_items_per_s']:,.0f} items/s, {rows[-1]['speedup']:.1f}x, identical {identical}")
    return rows


def epoch_row(train, val, params, repeats: int, threads: int) -> dict:
    """One epoch of the searched winner per arm: img/s, epoch seconds, and whether the weights agree."""
    from models._registry import build
    from pipelines.engine import EngineSettings, fit
    from pipelines.tasks import ClassifyTask

    cfg = params.train.classify.updated(epochs=1, batch_size=64, lr=0.0996, aug_strength=0.63, warmup_epochs=1)
    settings = EngineSettings(device="cpu", amp="off", num_threads=threads, num_workers=0, seed=params.seed)
    batched_augmenter = ClassifyTask.augmenter

    def per_item(self, data, policy, strength):  # torchvision's steps: no whole-batch form
        return batched_augmenter(self, data, policy, strength).steps

    best, weights = {"torchvision": {}, "batched": {}}, {}
    for _ in range(repeats):
        for arm in best:
            runtime.seed_everything(params.seed, params.deterministic)
            model = build("classify", "resnet", len(train.classes), train.in_channels, train.image_size, **WINNER)
            per_item_path = arm == "torchvision"
            with mock.patch.object(ClassifyTask, "augmenter", per_item) if per_item_path else contextlib.nullcontext():
                result = fit(model, "classify", train, val, cfg, settings, policy=params.augment.policy, log=None)
            metrics = result.history[-1].metrics
            if metrics["images_per_s"] > best[arm].get("images_per_s", 0):
                best[arm] = {"images_per_s": metrics["images_per_s"], "epoch_s": metrics["epoch_s"]}
            digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in model.state_dict().values()))
            weights[arm] = digest.hexdigest()
    row = {"model": "resnet 10/16, dropout 0.45", "items": len(train), "batch": cfg.batch_size,
           **{f"{arm}_{k}": v for arm, values in best.items() for k, v in values.items()},
           "speedup": best["batched"]["images_per_s"] / best["torchvision"]["images_per_s"],
           "same_weights": weights["torchvision"] == weights["batched"]}
    print(f"epoch: torchvision {row['torchvision_images_per_s']:,.0f} img/s, batched "
          f"{row['batched_images_per_s']:,.0f} img/s, {row['speedup']:.2f}x, same weights {row['same_weights']}")
    return row


def main(argv: list[str] | None = None) -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=positive, default=12800, help="training items augmented per pass")
    parser.add_argument("--epoch-items", type=positive, default=12800, help="training items of the timed epoch")
    parser.add_argument("--repeats", type=positive, default=3)
    parser.add_argument("--threads", type=thread_count, default=0, help="torch threads of the epoch (0: every core)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="its augment.policy is timed")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "prepared" / "classify",
                        help="a prepared classify folder (the augment stage's)")
    parser.add_argument("--out", type=result_file, default=ROOT / "bench" / "results" / "augment.json")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)

    import torch

    from pipelines.datasets import load_classify
    from pipelines.errors import ConvForgeError
    from pipelines.params import load_params
    from pipelines.transforms import CropFlip, build_policy

    try:
        params = load_params(args.params)
        train, val = (load_classify(args.data, split) for split in ("train", "val"))
    except ConvForgeError as error:
        sys.exit(f"error: {error}")
    policies = {strength: build_policy(params.augment.policy, train.image_size, train.in_channels, strength)
                for strength in STRENGTHS}
    if not all(isinstance(policy, CropFlip) for policy in policies.values()):
        sys.exit(f"error: augment.policy in {args.params} has steps besides crop and flip (or neither): only crop and "
                 "flip augment whole batches, so there is nothing to compare")
    machine = describe()
    torch.set_num_threads(1)
    images = train.images[:args.items]
    rows = augmentation_rows(images, policies, args.repeats, batch=64)
    runtime.set_threads(args.threads)
    epoch = epoch_row(train.subset(args.epoch_items, params.seed), val.subset(1000, 0), params, args.repeats,
                      args.threads)
    machine["load_avg_at_end"] = load_average()
    if args.note:
        machine["note"] = args.note
    command = " ".join(["python bench/augment.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"machine": machine, "command": command,
              "items": len(images), "epoch_threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows,
              "epoch": epoch, "target": TARGET}
    runtime.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
