"""Training throughput: the ConvForge engine (MLflow tracking on) vs a plain PyTorch loop vs a naive loop.

Same model, batch size, optimizer, threads, memory format and deterministic-algorithms mode, no
augmentation, Fashion-MNIST train images:
- engine: `pipelines.engine.fit` inside an MLflow run (SQLite store in a temp dir, system
  metrics on, per-epoch metrics logged), settings from params.yaml;
- plain: the textbook loop over a pre-normalized float tensor, sliced per batch;
- naive: torchvision's FashionMNIST dataset (PIL image + ToTensor + Normalize per item) and a
  DataLoader, as most tutorials write it.
The baselines take the memory format the engine resolves for this machine (channels_last on the
CPU), so the ratios measure the loop, not the layout.
Each variant trains `--epochs` epochs of `--images` images; img/s is taken over the epochs after
the first (warm-up), best of `--repeats` interleaved runs, both per wall-clock second and per
CPU second of the process (the latter is steadier on a shared machine: it ignores time spent
waiting for a core). Targets: engine >= 0.95x plain and >= 2x naive.

    .venv/bin/python bench/train_throughput.py              # ~2-3 min, 1 thread
    .venv/bin/python bench/train_throughput.py --threads 0  # every core (an otherwise idle machine)
Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)
from bench.machine import Parser, describe, load_average, positive, result_file, thread_count  # noqa: E402

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
# hparams, and images per epoch (epochs of a few seconds at 1 thread: the per-epoch validation
# and MLflow logging weigh as little as in a real 54k-image epoch)
MODELS = {"lenet5": ({}, 12288), "resnet": ({"depth": 10, "width": 16}, 3072)}


def fashion_mnist(root: Path):
    """torchvision's FashionMNIST over the Debian IDX files (extracted into `root`), or a download."""
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import extract_archive

    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    if all((DEBIAN / gz).is_file() for gz, _ in FashionMNIST.resources):
        for gz, _ in FashionMNIST.resources:
            extract_archive(str(DEBIAN / gz), str(raw))
        return FashionMNIST(str(root), train=True, download=False)
    return FashionMNIST(str(root), train=True, download=True)


def build(name: str, seed: int = 0):
    import torch

    from models._registry import build as build_model

    torch.manual_seed(seed)
    return build_model("classify", name, 10, 1, 28, **MODELS[name][0])


class Clock:
    """Wall and CPU seconds of this process since the last lap."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return out


def rates(epochs: list[tuple[int, float, float]]) -> dict[str, float]:
    """img/s per wall second and per CPU second over every epoch after the first (images, wall_s, cpu_s)."""
    later = epochs[1:] or epochs
    images = sum(n for n, _, _ in later)
    return {"wall": images / sum(w for _, w, _ in later), "cpu": images / sum(c for _, _, c in later)}


def layout(channels_last: bool):
    """The memory format the engine uses for models and batches."""
    import torch

    return torch.channels_last if channels_last else torch.contiguous_format


def plain_loop(name: str, images, labels, mean: float, std: float, batch: int, epochs: int,
               lr: float, channels_last: bool) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    model = build(name).to(memory_format=layout(channels_last))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = ((images.float() / 255 - mean) / std).contiguous(memory_format=layout(channels_last))
    times = []
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        clock = Clock()
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(x[idx].contiguous(memory_format=layout(channels_last))), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append((len(x) // batch * batch, *clock.lap()))
    return rates(times)


def naive_loop(name: str, dataset, count: int, mean: float, std: float, batch: int, epochs: int,
               lr: float, channels_last: bool) -> dict[str, float]:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms

    dataset.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    loader = DataLoader(Subset(dataset, range(count)), batch_size=batch, shuffle=True, drop_last=True)
    model = build(name).to(memory_format=layout(channels_last))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    times = []
    for _ in range(epochs):
        clock = Clock()
        seen = 0
        for x, y in loader:
            loss = F.cross_entropy(model(x.contiguous(memory_format=layout(channels_last))), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
        times.append((seen, *clock.lap()))
    return rates(times)


def engine_run(name: str, train, val, batch: int, epochs: int, lr: float, threads: int,
               store: Path) -> dict[str, float]:
    from pipelines import tracking
    from pipelines.engine import EngineSettings, fit
    from pipelines.params import load_params

    params = load_params(ROOT / "params.yaml")
    settings = EngineSettings.from_params(params)
    settings = EngineSettings(**{**settings.__dict__, "num_threads": threads, "device": "cpu"})
    cfg = params.train.classify.updated(epochs=epochs, batch_size=batch, lr=lr, optimizer="sgd", warmup_epochs=0,
                                        schedule="constant", aug_strength=0.0)
    tracking.use_store(f"sqlite:///{store / 'mlflow.db'}")
    experiment = tracking.ensure_experiment("bench")
    times = []
    with tracking.training_run(experiment, None, "classify", name):
        tracking.log_params({"family": name, "train": cfg.model_dump()})
        model = build(name)
        clock = Clock()

        def on_epoch(result) -> None:
            # Each lap spans the epoch's training, its (small) validation pass and the previous
            # epoch's MLflow logging: the engine's whole cost per epoch with tracking on.
            times.append((len(train) // batch * batch, *clock.lap()))
            tracking.log_metrics(result.metrics, step=result.epoch)

        fit(model, "classify", train, val, cfg, settings, policy=None, on_epoch=on_epoch, log=None)
    return rates(times)


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=positive, default=None, help="training images per epoch (default per model)")
    parser.add_argument("--epochs", type=positive, default=3, help="epochs per variant (the first is warm-up)")
    parser.add_argument("--batch", type=positive, default=128)
    parser.add_argument("--threads", type=thread_count, default=1,
                        help="torch threads (0 = every core; on a shared box more threads than free cores collapse)")
    parser.add_argument("--repeats", type=positive, default=2, help="best of N (the box may be shared)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--note", default="", help="how this run differs from the default (recorded in the JSON)")
    parser.add_argument("--out", type=result_file, default=ROOT / "bench/results/train_throughput.json")
    args = parser.parse_args()

    import torch

    from pipelines.datasets import ClassifyData
    from pipelines.engine import EngineSettings
    from pipelines.params import load_params

    machine = describe()
    threads = runtime.set_threads(args.threads)
    channels_last = EngineSettings.from_params(load_params(ROOT / "params.yaml")).choice().channels_last
    lr = 0.01
    with tempfile.TemporaryDirectory(prefix="convforge-bench-") as tmp:
        dataset = fashion_mnist(Path(tmp) / "data")
        classes = list(dataset.classes)
        rows = []
        variants = ("engine", "plain", "naive")
        for name in args.models:
            count = args.images or MODELS[name][1]
            images = dataset.data[:count][:, None].contiguous()  # uint8 [N, 1, 28, 28]
            labels = dataset.targets[:count].long()
            mean, std = float(images.float().mean() / 255), float(images.float().std() / 255)
            train = ClassifyData(images, labels, classes, [mean], [std])
            val = ClassifyData(dataset.data[-512:][:, None].contiguous(), dataset.targets[-512:].long(), classes,
                               [mean], [std])
            best = {(v, clock): 0.0 for v in variants for clock in ("wall", "cpu")}
            for repeat in range(args.repeats):  # interleaved, so a busy moment hits every variant alike
                store = Path(tmp) / f"mlflow-{name}-{repeat}"
                store.mkdir()
                measured = {
                    "engine": engine_run(name, train, val, args.batch, args.epochs, lr, threads, store),
                    "plain": plain_loop(name, images, labels, mean, std, args.batch, args.epochs, lr, channels_last),
                    "naive": naive_loop(name, dataset, count, mean, std, args.batch, args.epochs, lr, channels_last),
                }
                for variant, values in measured.items():
                    for clock, value in values.items():
                        best[variant, clock] = max(best[variant, clock], value)
                print(f"  {name} repeat {repeat + 1}: " + ", ".join(
                    f"{v} {measured[v]['wall']:.0f} img/s ({measured[v]['cpu']:.0f} per CPU-s)" for v in variants),
                    flush=True)
            row = {"model": name, "hparams": MODELS[name][0], "images": count}
            for clock in ("wall", "cpu"):
                row.update({f"{v}_img_per_s_{clock}": round(best[v, clock], 1) for v in variants})
                row[f"engine_vs_plain_{clock}"] = round(best["engine", clock] / best["plain", clock], 3)
                row[f"engine_vs_naive_{clock}"] = round(best["engine", clock] / best["naive", clock], 3)
            rows.append(row)

    print(f"\nTraining throughput, Fashion-MNIST 28x28, batch {args.batch}, {threads} thread(s), "
          f"{args.epochs} epochs per variant (first = warm-up), best of {args.repeats}")
    print(f"{'model':<8}{'clock':<6}{'engine+MLflow':>15}{'plain':>10}{'naive PIL':>11}"
          f"{'vs plain':>10}{'vs naive':>10}")
    for r in rows:
        for clock in ("wall", "cpu"):
            print(f"{r['model']:<8}{clock:<6}{r[f'engine_img_per_s_{clock}']:>15.0f}"
                  f"{r[f'plain_img_per_s_{clock}']:>10.0f}"
                  f"{r[f'naive_img_per_s_{clock}']:>11.0f}{r[f'engine_vs_plain_{clock}']:>9.2f}x"
                  f"{r[f'engine_vs_naive_{clock}']:>9.2f}x")
    targets = {"engine_vs_plain": 0.95, "engine_vs_naive": 2.0}
    met = {f"{r['model']}.{k}_{clock}": r[f"{k}_{clock}"] >= v
           for r in rows for k, v in targets.items() for clock in ("wall", "cpu")}
    print("targets (>= 0.95x plain, >= 2x naive): " + ", ".join(f"{k} {'met' if ok else 'NOT met'}"
                                                                 for k, ok in met.items()))
    runtime.write_json(args.out, {
        "bench": "train_throughput", "rows": rows, "targets": targets, "targets_met": met,
        "settings": {"batch_size": args.batch, "threads": threads, "channels_last": channels_last,
                     "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                     "epochs": args.epochs, "repeats": args.repeats},
        "note": args.note, "machine": {**machine, "load_avg_at_end": load_average()}})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
