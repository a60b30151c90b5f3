"""The device check: does ConvForge use a GPU well? One run, at most 5 minutes on one GPU.

  1. engine vs a plain PyTorch loop (same model, batch, AMP dtype, memory format and resident uint8
     data) for ResNet-18 at 32 px and FCOS at 256 px, with GPU utilisation sampled by `nvidia-smi -lms 200`
     in a background process during the engine's training epochs;
  2. the real search on Fashion-MNIST (data/prepared/classify) with bench/gpu_profile.yaml's overrides:
     four trials at `gpus_per_trial: 0.25` at the same time on the GPU (each trial's start and end from
     its MLflow run: their timelines overlap), then the final training and its test accuracy;
  3. served classify req/s at 1 and 64 clients, `serve.device: cuda` vs `cpu` (bench/serve.py's servers
     and closed-loop client).

    .venv/bin/python bench/gpu_check.py                  # on a CUDA machine: writes bench/results/gpu.json
    .venv/bin/python bench/gpu_check.py --cpu-dry-run    # every step on the CPU at toy size (< 2 min)

Targets on the GPU: engine >= 0.95x the plain loop, utilisation >= 85 % during the engine's epochs,
served req/s at 64 clients >= 5x the CPU server's. Without CUDA (and without --cpu-dry-run) it stops
with one line and exit status 1. The dry run's figures mean nothing: it proves every step runs, and
prints its result instead of writing it (unless --out).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)
from bench.machine import Parser, result_file  # noqa: E402
from pipelines.errors import stage_entry  # noqa: E402

TARGETS = {"engine_vs_plain": 0.95, "utilisation_pct": 85.0, "served_gpu_vs_cpu_at_64": 5.0}
PROFILE = ROOT / "bench" / "gpu_profile.yaml"
# (task, family, hparams, image size, channels, train items, batch, epochs); the dry run shrinks them
WORKLOADS = {"resnet18_32px": ("classify", "resnet", {"depth": 18, "width": 64}, 32, 3, 25_600, 256, 4),
             "fcos_256px": ("detect", "fcos", {"backbone": "resnet", "fpn_channels": 64}, 256, 3, 1_536, 32, 3)}


# ---------------------------------------------------------------- GPU utilisation


def training_gpu() -> str:
    """nvidia-smi's id of the GPU torch trains on (cuda:0) by its UUID: nvidia-smi numbers GPUs in PCI order and
    ignores CUDA_VISIBLE_DEVICES, so on a shared box `--id=0` may be another job's card."""
    import torch

    return f"GPU-{torch.cuda.get_device_properties(0).uuid}"


class Utilisation:
    """`nvidia-smi --query-gpu=utilization.gpu -lms 200` in a background process: (time, %) samples of the GPU
    torch trains on."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.process = None
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                ["nvidia-smi", f"--id={training_gpu()}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "200"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.strip().isdigit():
                self.samples.append((time.monotonic(), float(line.strip())))

    def mean(self, windows: list[tuple[float, float]]) -> float | None:
        """Mean utilisation over the samples inside `windows` (monotonic start, end); None without samples."""
        inside = [value for at, value in self.samples if any(start <= at <= end for start, end in windows)]
        return round(statistics.fmean(inside), 1) if inside else None

    def close(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)


# ---------------------------------------------------------------- engine vs a plain loop


def synthetic(task: str, count: int, size: int, channels: int, seed: int):
    """`count` random uint8 images with labels (classify) or two boxes each (detect), as the engine's datasets."""
    import torch

    from pipelines.datasets import ClassifyData, SceneData

    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, channels, size, size), dtype=torch.uint8, generator=generator)
    classes, mean, std = [str(c) for c in range(10)], [0.5] * channels, [0.25] * channels
    if task == "classify":
        return ClassifyData(images, torch.randint(0, 10, (count,), generator=generator), classes, mean, std)
    targets = []
    for _ in range(count):
        corner = torch.randint(0, size // 2, (2, 2), generator=generator).float()
        boxes = torch.cat([corner, corner + size // 4], dim=1)  # two 1/4-size boxes, xyxy
        masks = torch.zeros((2, size, size), dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(0, 10, (2,), generator=generator), "masks": masks})
    semantic = torch.zeros((count, size, size), dtype=torch.uint8)
    return SceneData(images, semantic, targets, classes, mean, std, list(range(count)))


def plain_loop(model, task: str, data, cfg, settings, epochs: int) -> float:
    """img/s of the bare loop after its first epoch: resident uint8 data, normalize, autocast, step."""
    import torch

    from pipelines.engine import _autocast, _normalizer, amp_dtype, batches_per_epoch, normalize, prepare, resident
    from pipelines.tasks import get_task

    adapter, device = get_task(task), prepare(model, settings)
    dtype, chosen = amp_dtype(settings), settings.choice()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler(device.type, enabled=chosen.grad_scaler)
    data, (mean, std) = resident(data, device), _normalizer(data.mean, data.std, device)
    model.train()
    rates = []
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch))
        started = time.perf_counter()
        steps = batches_per_epoch(len(data), cfg.batch_size)
        for b in range(steps):
            batch = adapter.gather(data, order[b * cfg.batch_size:(b + 1) * cfg.batch_size]).to(device)
            with _autocast(device, dtype):
                loss = adapter.loss(model, normalize(batch.images, mean, std, chosen.channels_last), batch.targets,
                                    cfg, None)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(min(len(data), steps * cfg.batch_size) / (time.perf_counter() - started))
    return statistics.fmean(rates[1:] or rates)


def engine_vs_plain(name: str, params, settings, utilisation: Utilisation, dry_run: bool) -> dict:
    """One workload through `pipelines.engine.fit` and through `plain_loop`, from the same initial weights."""
    import torch

    from models import build
    from pipelines.engine import fit

    task, family, hparams, size, channels, count, batch, epochs = WORKLOADS[name]
    if dry_run:  # the same code at toy size: narrow models, small images, few items
        hparams = {**hparams, **({"width": 8} if "width" in hparams else {"fpn_channels": 32})}
        size, count, batch, epochs = min(size, 64), 32, 16, 2
    train, val = synthetic(task, count, size, channels, 0), synthetic(task, max(batch, count // 16), size, channels, 1)
    cfg = params.train.task(task).updated(epochs=epochs, batch_size=batch, optimizer="sgd", schedule="constant",
                                          warmup_epochs=0, aug_strength=0.0, ema_decay=0.0, mixup_alpha=0.0,
                                          cutmix_alpha=0.0, early_stop_patience=0, pretrained=None, freeze=0)
    torch.manual_seed(0)
    model = build(task, family, 10, channels, size, **hparams)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    windows: list[tuple[float, float]] = []

    def on_epoch(result) -> None:  # the epoch's training time, validation excluded
        end = time.monotonic() - (result.metrics["wall_s"] - result.metrics["epoch_s"])
        windows.append((end - result.metrics["epoch_s"], end))

    result = fit(model, task, train, val, cfg, settings, policy=None, on_epoch=on_epoch, log=None)
    engine = statistics.fmean([r.metrics["images_per_s"] for r in result.history[1:]] or [result.images_per_s])
    model.load_state_dict(initial)
    plain = plain_loop(model, task, train, cfg, settings, epochs)
    return {"workload": name, "task": task, "family": family, "hparams": hparams, "image_size": size,
            "items": count, "batch_size": batch, "epochs": epochs, "engine_img_s": round(engine, 1),
            "plain_img_s": round(plain, 1), "engine_vs_plain": round(engine / plain, 3),
            "utilisation_pct": utilisation.mean(windows[1:] or windows)}


# ---------------------------------------------------------------- the search and training, four trials a GPU


def profile_params(dry_run: bool):
    """params.yaml with bench/gpu_profile.yaml merged in (the dry run: toy budgets, no GPU share)."""
    import yaml

    from pipelines.params import Params, validate

    def merge(base: dict, over: dict) -> dict:
        return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                           for k, v in over.items()}}

    raw = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load(PROFILE.read_text()))
    if dry_run:
        raw = merge(raw, {"search": {"gpus_per_trial": "auto", "max_concurrent": 2, "classify": {
            "families": ["lenet5"], "num_samples": 2, "max_epochs": 1, "train_subset": None,
            "space": {"batch_size": [64]}}}, "train": {"classify": {"epochs": 1, "batch_size": 64}}})
    return validate(Params, raw)


def toy_data(data_root: Path, work: Path, items: int = 256) -> Path:
    """The first `items` of each split of a prepared classify folder (the dry run's data)."""
    import numpy as np

    toy = work / "toy-classify"
    for split in ("train", "val", "test"):
        (toy / split).mkdir(parents=True)
        for name in ("images.npy", "labels.npy"):
            np.save(toy / split / name, np.load(data_root / split / name, mmap_mode="r")[:items])
    shutil.copy(data_root / "meta.json", toy / "meta.json")
    return toy


def trial_timelines(experiment_id: str, parent_id: str) -> list[dict]:
    """Each trial's MLflow run: device tag and start/end (seconds after the first trial started)."""
    from mlflow import MlflowClient

    runs = MlflowClient().search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    first = min(run.info.start_time for run in runs)
    return sorted(({"trial_id": run.data.tags.get("convforge.trial_id"), "family": run.data.params.get("family"),
                    "device": run.data.tags.get("convforge.device"),
                    "start_s": round((run.info.start_time - first) / 1000, 1),
                    "end_s": round(((run.info.end_time or run.info.start_time) - first) / 1000, 1)}
                   for run in runs), key=lambda t: t["start_s"])


def most_at_once(timelines: list[dict]) -> int:
    """The largest number of trials running at the same moment."""
    edges = sorted([(t["start_s"], 1) for t in timelines] + [(t["end_s"], -1) for t in timelines],
                   key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def search_and_train(data_root: Path, work: Path, dry_run: bool) -> dict:
    """The real search (the profile's trials sharing the GPU), the final training and its test accuracy."""
    from models import _checkpoint as checkpoint
    from pipelines.engine import EngineSettings, evaluate
    from pipelines.search import run_search, trial_resources
    from pipelines.tasks import get_task
    from pipelines.training import run_training

    params = profile_params(dry_run)
    data_root = toy_data(data_root, work) if dry_run else data_root
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    started = time.monotonic()
    best = run_search(params, "classify", data_root, work / "search", storage=str(work / "ray"), log=lambda m: None)
    search_s = time.monotonic() - started
    from mlflow import MlflowClient

    parent = MlflowClient().get_run(best["mlflow_parent_run_id"])
    timelines = trial_timelines(parent.info.experiment_id, parent.info.run_id)
    started = time.monotonic()
    run_training(params, "classify", data_root, work / "search" / "best.json", work / "model", log=lambda m: None)
    train_s = time.monotonic() - started
    model, _ = checkpoint.load(work / "model")
    test = get_task("classify").load_split(data_root, "test")
    accuracy = evaluate(model, "classify", test, EngineSettings.from_params(params), batch_size=512)["accuracy"]
    cpus, gpus = trial_resources(params)
    return {"overrides": str(PROFILE.relative_to(ROOT)), "cpus_per_trial": cpus, "gpus_per_trial": gpus,
            "trials": timelines, "trials_at_once": most_at_once(timelines), "search_s": round(search_s, 1),
            "winner": {"family": best["family"], "model": best["model"], "val_accuracy": round(best["score"], 4)},
            "train_s": round(train_s, 1), "test_accuracy": round(float(accuracy), 4)}


# ---------------------------------------------------------------- serving on the GPU vs the CPU


def served(work: Path, dry_run: bool) -> dict:
    """Classify req/s at 1 and 64 clients: one server with serve.device cuda (cpu in the dry run), one cpu."""
    from bench.serve import (Config, Sample, bench_models, free_port, launch, measure, png_payload, stop, wait_ready,
                             write_params)
    from pipelines.tasks import ClassifyTask

    models, source = bench_models(work)
    duration = 2.0 if dry_run else 10.0
    devices = {"gpu": "cpu" if dry_run else "cuda", "cpu": "cpu"}
    servers = {}
    try:
        for name, device in devices.items():
            config = Config(f"classify-{name}", "bento", {"backend": "torch", "device": device})
            params = write_params(work, config.name, config.serve)
            port = free_port()
            servers[name] = (port, launch(config, models, params, port, work), work / f"{config.name}.log")
        for port, process, log in servers.values():
            wait_ready(port, process, log)
        body, rows = png_payload(ClassifyTask.name, 28), {}
        for clients in (1, 64):
            for name, (port, _, _) in servers.items():
                rows[f"{name}_rps_at_{clients}"] = measure(port, f"/{ClassifyTask.name}", body, clients, duration,
                                                           Sample()).summary()["rps"]
    finally:
        for _, process, _ in servers.values():
            stop(process)
    ratio = rows["gpu_rps_at_64"] / rows["cpu_rps_at_64"] if rows.get("cpu_rps_at_64") else None
    return {"model": source.get(ClassifyTask.name), "devices": devices, **rows,
            "gpu_vs_cpu_at_64": round(ratio, 2) if ratio else None}



# ---------------------------------------------------------------- the run


def verdict(result: dict) -> dict:
    """Each target: the figures measured against it and whether they meet it."""
    ratios = [w["engine_vs_plain"] for w in result["engine_vs_plain"]]
    busy = [w["utilisation_pct"] for w in result["engine_vs_plain"] if w["utilisation_pct"] is not None]
    served_ratio = result["serving"]["gpu_vs_cpu_at_64"]
    return {"engine_vs_plain": {"min": min(ratios), "met": min(ratios) >= TARGETS["engine_vs_plain"]},
            "utilisation_pct": {"min": min(busy) if busy else None,
                                "met": bool(busy) and min(busy) >= TARGETS["utilisation_pct"]},
            "served_gpu_vs_cpu_at_64": {"value": served_ratio, "met": served_ratio is not None
                                        and served_ratio >= TARGETS["served_gpu_vs_cpu_at_64"]},
            "trials_overlap": {"value": result["search"]["trials_at_once"],
                               "met": result["search"]["trials_at_once"] >= 2}}


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="every step on the CPU at toy size")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "prepared" / "classify",
                        help="the prepared Fashion-MNIST (the augment stage's data/prepared/classify)")
    parser.add_argument("--out", type=result_file,
                        help="result file (default bench/results/gpu.json; the dry run prints it)")
    args = parser.parse_args()
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, "
              "or with --cpu-dry-run to check every step on the CPU", file=sys.stderr)
        raise SystemExit(1)
    if not (args.data / "meta.json").is_file():
        print(f"gpu_check: {args.data} has no prepared data (run `dvc repro augment` first)", file=sys.stderr)
        raise SystemExit(1)
    from pipelines.engine import EngineSettings

    params = profile_params(args.cpu_dry_run)
    settings = replace(EngineSettings.from_params(params), deterministic=False, num_workers=0)
    hardware = runtime.probe()
    print(runtime.device_line(settings.choice(), hardware), flush=True)
    started, utilisation = time.monotonic(), Utilisation()
    result: dict = {"dry_run": args.cpu_dry_run, "device": runtime.device_record(settings.choice(), hardware),
                    "targets": TARGETS}
    with tempfile.TemporaryDirectory(prefix="convforge-gpu-check-") as tmp:
        work = Path(tmp)
        try:
            result["engine_vs_plain"] = [engine_vs_plain(name, params, settings, utilisation, args.cpu_dry_run)
                                         for name in WORKLOADS]
            print(f"engine vs plain loop: {result['engine_vs_plain']}", flush=True)
            result["search"] = search_and_train(args.data, work, args.cpu_dry_run)
            print(f"search + train: {result['search']}", flush=True)
            result["serving"] = served(work, args.cpu_dry_run)
            print(f"serving: {result['serving']}", flush=True)
        finally:
            utilisation.close()
    result["verdict"], result["seconds"] = verdict(result), round(time.monotonic() - started, 1)
    if args.cpu_dry_run and not args.out:  # its figures mean nothing: shown, not kept
        print(json.dumps(result, indent=2), flush=True)
        return
    out = args.out or ROOT / "bench" / "results" / "gpu.json"
    runtime.write_json(out, result)
    print(json.dumps(result["verdict"]), f"({result['seconds']} s); wrote {out}", flush=True)


if __name__ == "__main__":
    stage_entry(main)()
