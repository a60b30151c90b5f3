"""The one training loop for every task: `fit`, `evaluate` and `predict` over in-memory uint8 tensors.

A task differs only by its adapter (pipelines/tasks.py). Without per-sample augmentation a batch
is a slice of the in-memory tensors (normalized on the device); with it, a DataLoader applies the
torchvision.transforms.v2 policy per sample. On CUDA: AMP (bf16 by default), pinned memory and
one batch of copy-ahead; everywhere: channels_last, optional torch.compile, a checkpoint per
epoch to resume from, and a deterministic mode in which two CPU runs give identical metrics.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from pipelines.errors import ConvForgeError
from pipelines.params import PolicyParams, TrainConfig
from pipelines.runtime import resolve_device, set_threads
from pipelines.tasks import PRIMARY, Batch, get_task

if TYPE_CHECKING:
    from pipelines.metrics import MetricReport
    from pipelines.params import Params

CHECKPOINT = "last.pt"
PROGRESS_EVERY_S = 30.0  # a progress line inside long epochs


@dataclass(frozen=True)
class EngineSettings:
    """How to run (not what to learn): device, precision, memory format, threads, determinism."""

    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    num_threads: int = 0
    num_workers: int = 0
    deterministic: bool = True
    seed: int = 0

    @classmethod
    def from_params(cls, params: "Params") -> "EngineSettings":
        """The settings of params.yaml's `train` section plus the global seed and determinism."""
        train = params.train
        return cls(device=train.device, amp=train.amp, channels_last=train.channels_last, compile=train.compile,
                   num_threads=train.num_threads, num_workers=train.num_workers,
                   deterministic=params.deterministic, seed=params.seed)


@dataclass
class EpochResult:
    epoch: int  # 1-based
    metrics: dict[str, float]  # train_loss, val_<metric>..., lr, images_per_s, epoch_s
    score: float  # the task's primary validation metric (maximized)


@dataclass
class FitResult:
    model: nn.Module  # with the best epoch's weights (the EMA weights when EMA is on)
    history: list[EpochResult]
    best_epoch: int
    best_score: float
    metric: str
    images_per_s: float


# ---------------------------------------------------------------- set-up


def amp_dtype(settings: EngineSettings, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on CUDA (no loss scaling needed), off on CPU; bf16/fp16 force it; off turns it off."""
    if settings.amp == "off" or (settings.amp == "auto" and device.type != "cuda"):
        return None
    if settings.amp == "fp16" and device.type != "cuda":
        raise ConvForgeError("train.amp fp16 needs CUDA; use bf16 or off on the CPU")
    return torch.float16 if settings.amp == "fp16" else torch.bfloat16


def prepare(model: nn.Module, settings: EngineSettings) -> torch.device:
    """Threads, determinism, device and memory format for a run; returns the device."""
    if settings.num_threads > 0:
        set_threads(settings.num_threads)
    if settings.deterministic:
        # CUDA: deterministic cuBLAS; bilinear upsampling's backward has no deterministic kernel,
        # so segmentation decoders warn rather than fail (determinism is promised on the CPU).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    device = resolve_device(settings.device)
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    return device


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (Sutskever et al. 2013) or AdamW (Loshchilov & Hutter 2019).

    No weight decay on biases and normalization parameters (1-D tensors), as is standard practice.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: linear warm-up then cosine (Loshchilov & Hutter 2017), one-cycle (Smith 2018), or constant."""
    from torch.optim import lr_scheduler as sched

    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        warm = min(0.3, max(cfg.warmup_epochs * steps_per_epoch / total, 1 / total))
        return sched.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total + 1, pct_start=warm,
                                cycle_momentum=cfg.optimizer == "sgd" and cfg.momentum > 0)
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
    main = (sched.CosineAnnealingLR(optimizer, T_max=total - warmup) if cfg.schedule == "cosine"
            else sched.ConstantLR(optimizer, factor=1.0, total_iters=0))
    if warmup <= 0:
        return main
    return sched.SequentialLR(optimizer, [sched.LinearLR(optimizer, 0.01, 1.0, total_iters=warmup), main],
                              milestones=[warmup])


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of weights and buffers (Polyak & Juditsky 1992), or None when off."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


# ---------------------------------------------------------------- data


def _normalizer(mean: Iterable[float], std: Iterable[float], device: torch.device
                ) -> tuple[Tensor, Tensor]:
    """Mean and std in uint8 units as [1, C, 1, 1] so a batch normalizes in one fused step."""
    mean_t = torch.tensor([255.0 * m for m in mean], device=device).view(1, -1, 1, 1)
    std_t = torch.tensor([255.0 * s for s in std], device=device).view(1, -1, 1, 1)
    return mean_t, std_t


def inputs_of(images: Tensor, mean: Iterable[float], std: Iterable[float]) -> Tensor:
    """uint8 [N, C, H, W] -> the normalized float input every model takes (on the images' device)."""
    mean_t, std_t = _normalizer(mean, std, images.device)
    return normalize(images, mean_t, std_t, channels_last=False)


def normalize(images: Tensor, mean: Tensor, std: Tensor, channels_last: bool) -> Tensor:
    """uint8 [B, C, H, W] -> normalized float32."""
    out = (images.float() - mean) / std
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


class _Samples(torch.utils.data.Dataset):
    """Per-sample augmented items of in-memory tensors (the DataLoader path)."""

    def __init__(self, task: Any, data: Any, augment: Callable):
        self.task, self.data, self.augment = task, data, augment

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Tensor, Any]:
        return self.task.item(self.data, i, self.augment)


def batches_per_epoch(total: int, batch_size: int) -> int:
    """Batches per epoch; a last batch of one item is dropped (batch norm cannot train on it)."""
    full, rest = divmod(total, batch_size)
    return full + (1 if rest > 1 else 0) if total > 1 else total


def train_batches(task: Any, data: Any, batch_size: int, generator: torch.Generator, augment: Callable | None,
                  settings: EngineSettings, pin: bool) -> Iterator[Batch]:
    """One epoch of shuffled CPU batches: slices of the tensors, or per-sample augmented through a DataLoader."""
    count = batches_per_epoch(len(data), batch_size)
    if augment is None:
        order = torch.randperm(len(data), generator=generator)
        for b in range(count):
            yield task.gather(data, order[b * batch_size:(b + 1) * batch_size])
        return
    loader = torch.utils.data.DataLoader(
        _Samples(task, data, augment), batch_size=batch_size, shuffle=True, generator=generator,
        num_workers=settings.num_workers, collate_fn=task.collate, pin_memory=pin,
        drop_last=len(data) % batch_size == 1 and len(data) > 1)
    yield from loader


def eval_batches(task: Any, data: Any, batch_size: int) -> Iterator[Batch]:
    """The split in order, as CPU batches."""
    for start in range(0, len(data), batch_size):
        yield task.gather(data, torch.arange(start, min(start + batch_size, len(data))))


def prefetch(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """Batches on `device`; on CUDA from pinned memory with the next copy issued before this batch computes."""
    if device.type != "cuda":
        yield from batches
        return
    pending = None
    for batch in batches:
        if not batch.images.is_cuda and not batch.images.is_pinned():
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=True)  # a no-op for what already lives on the GPU
        if pending is not None:
            yield pending
        pending = batch
    if pending is not None:
        yield pending


def resident(data: Any, device: torch.device) -> Any:
    """On CUDA, the dataset's uint8 images (and masks) on the GPU when they fit easily; else unchanged."""
    from dataclasses import replace

    if device.type != "cuda":
        return data
    size = data.images.numel() + (data.masks.numel() if hasattr(data, "masks") else 0)
    if size > 0.25 * torch.cuda.mem_get_info(device)[0]:
        return data
    moved = {"images": data.images.to(device)}
    if hasattr(data, "labels"):
        moved["labels"] = data.labels.to(device)
    if hasattr(data, "masks"):
        moved["masks"] = data.masks.to(device)
    return replace(data, **moved)


# ---------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save of tensors and plain values only, written atomically (loaded with weights_only=True)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of the weights, in the standard memory format (safetensors wants contiguous)."""
    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for k, v in module.state_dict().items()}


def _changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    return ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in new.items() if old.get(k) != v)


# ---------------------------------------------------------------- the loop


def fit(model: nn.Module, task: str, train: Any, val: Any, cfg: TrainConfig, settings: EngineSettings, *,
        policy: PolicyParams | None = None, checkpoint_dir: Path | None = None,
        on_epoch: Callable[[EpochResult], None] | None = None,
        log: Callable[[str], None] | None = print) -> FitResult:
    """Train `model` on `train`, select the best epoch on `val`; resumes from `checkpoint_dir/last.pt` if present.

    `on_epoch` runs after the epoch's checkpoint is written (a tuner may report and copy it).
    """
    say = log or (lambda message: None)
    adapter = get_task(task)
    device = prepare(model, settings)
    dtype = amp_dtype(settings, device)
    if len(train) < 2:
        raise ConvForgeError(f"{task}: the training split has {len(train)} item(s); need at least 2")
    forward_model = model
    if settings.compile and task != "detect":  # torchvision's detection models do not compile cleanly
        forward_model = torch.compile(model)
    optimizer = make_optimizer(model, cfg)
    steps = batches_per_epoch(len(train), cfg.batch_size)
    ema = make_ema(model, cfg.ema_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    mean, std = _normalizer(train.mean, train.std, device)
    augment = adapter.augmenter(train, policy, cfg.aug_strength)
    mixer = adapter.mixer(cfg, len(train.classes))
    train_data = resident(train, device) if augment is None else train
    channels_last = settings.channels_last

    history: list[EpochResult] = []
    best_score, best_epoch, best_state, bad_epochs, start = -math.inf, 0, None, 0, 1
    path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if path is not None and path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state["ema"] is not None:
            ema.load_state_dict(state["ema"])
        history = [EpochResult(**entry) for entry in state["history"]]
        best_score, best_epoch, best_state = state["best_score"], state["best_epoch"], state["best_state"]
        bad_epochs, start = state["bad_epochs"], state["epoch"] + 1
        changed = _changed(state["cfg"], cfg.model_dump())
        say(f"resuming {task} at epoch {start}" + (f" with changed config: {changed}" if changed else ""))
    # The optimizer keeps its moments; its hyperparameters come from cfg (a tuner may have changed them).
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
        group.pop("initial_lr", None)
        if "momentum" in group:
            group["momentum"] = cfg.momentum
    optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay  # group 1 (biases, norms) never decays
    scheduler = make_scheduler(optimizer, cfg, steps)
    with warnings.catch_warnings():  # replaying the finished steps of the schedule
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(min(start - 1, cfg.epochs) * steps):
            scheduler.step()

    train_seconds = sum(r.metrics["epoch_s"] for r in history)
    wall_seconds = sum(r.metrics.get("wall_s", r.metrics["epoch_s"]) for r in history)
    train_images = sum(r.metrics["images_per_s"] * r.metrics["epoch_s"] for r in history)
    stop = start > cfg.epochs or (cfg.early_stop_patience > 0 and bad_epochs >= cfg.early_stop_patience)
    for epoch in range(start, cfg.epochs + 1):
        if stop:
            break
        # Everything random in an epoch (order, augmentation, dropout, mixup) follows from (seed, epoch):
        # a resumed run repeats the uninterrupted one exactly.
        epoch_seed = (settings.seed * 1_000_003 + epoch) % (2**63)
        torch.manual_seed(epoch_seed)
        generator = torch.Generator().manual_seed(epoch_seed)
        model.train()
        started = last_note = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        batches = train_batches(adapter, train_data, cfg.batch_size, generator, augment, settings,
                                pin=device.type == "cuda")
        for step, batch in enumerate(prefetch(batches, device), 1):
            images = normalize(batch.images, mean, std, channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = adapter.loss(forward_model, images, batch.targets, cfg, mixer)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.detach() * len(batch)
            seen += len(batch)
            now = time.perf_counter()
            if now - last_note > PROGRESS_EVERY_S:
                last_note = now
                say(f"epoch {epoch}/{cfg.epochs}: {step}/{steps} batches, loss {float(loss_sum) / seen:.4f}, "
                    f"{seen / (now - started):.0f} img/s")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_s = time.perf_counter() - started
        train_loss = float(loss_sum) / max(1, seen)
        if not math.isfinite(train_loss):
            raise ConvForgeError(f"{task}: training diverged in epoch {epoch} (loss {train_loss}); "
                                 f"lower train.{task}.lr (now {cfg.lr})")
        train_seconds += epoch_s
        train_images += seen

        eval_model = ema.module if ema is not None else model
        report = _evaluate(eval_model, adapter, val, settings, device, cfg.batch_size)
        score = report.scalars[adapter.metric]
        wall_s = time.perf_counter() - started
        wall_seconds += wall_s
        metrics = {"train_loss": train_loss, **{f"val_{k}": v for k, v in report.scalars.items()},
                   "lr": optimizer.param_groups[0]["lr"], "images_per_s": seen / epoch_s, "epoch_s": epoch_s,
                   "wall_s": wall_s}
        result = EpochResult(epoch, metrics, score)
        history.append(result)
        if score > best_score:
            best_score, best_epoch, best_state, bad_epochs = score, epoch, _cpu_state(eval_model), 0
        else:
            bad_epochs += 1
        stop = cfg.early_stop_patience > 0 and bad_epochs >= cfg.early_stop_patience
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            _save_checkpoint(path, {
                "epoch": epoch, "cfg": cfg.model_dump(), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "history": [asdict(r) for r in history],
                "best_score": best_score, "best_epoch": best_epoch, "best_state": best_state,
                "bad_epochs": bad_epochs})
        eta = 0.0 if stop else (cfg.epochs - epoch) * wall_seconds / len(history)
        say(f"epoch {epoch}/{cfg.epochs}  loss {train_loss:.4f}  {PRIMARY[task]} {score:.4f}  "
            f"lr {metrics['lr']:.2e}  {metrics['images_per_s']:.0f} img/s  {epoch_s:.1f} s  ETA {eta:.0f} s"
            + ("  (early stop)" if stop else ""))
        if on_epoch is not None:
            on_epoch(result)

    if best_state is not None:
        model.load_state_dict(best_state)
    model.to(memory_format=torch.contiguous_format)  # plain tensors for saving and export
    model.eval()
    return FitResult(model, history, best_epoch, best_score, PRIMARY[task],
                     train_images / train_seconds if train_seconds > 0 else 0.0)


# ---------------------------------------------------------------- evaluation and prediction


@torch.inference_mode()
def _evaluate(model: nn.Module, adapter: Any, data: Any, settings: EngineSettings, device: torch.device,
              batch_size: int) -> "MetricReport":
    model.eval()
    dtype = amp_dtype(settings, device)
    mean, std = _normalizer(data.mean, data.std, device)
    meter = adapter.meter(data.classes)
    for batch in prefetch(eval_batches(adapter, data, batch_size), device):
        images = normalize(batch.images, mean, std, settings.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs = adapter.outputs(model, images)
        adapter.update(meter, outputs, batch)
    return meter.compute()


def evaluate_report(model: nn.Module, task: str, data: Any, settings: EngineSettings,
                    batch_size: int = 64) -> "MetricReport":
    """Every metric of `task` on a split: scalars, per-class values, confusion matrix, PR curve."""
    device = prepare(model, settings)
    return _evaluate(model, get_task(task), data, settings, device, batch_size)


def evaluate(model: nn.Module, task: str, data: Any, settings: EngineSettings,
             batch_size: int = 64) -> dict[str, float]:
    """The metrics of `task` on a split as one flat dict (`accuracy`, ..., `accuracy.<class>`)."""
    return evaluate_report(model, task, data, settings, batch_size).flat()


@torch.inference_mode()
def predict(model: nn.Module, task: str, images: Tensor, mean: Iterable[float], std: Iterable[float],
            settings: EngineSettings, batch_size: int = 64) -> Any:
    """Predictions for uint8 images [N, C, H, W], on the CPU.

    classify: probabilities [N, C]; detect: per image {"boxes" xyxy, "scores", "labels" 0..C-1[, "masks"]};
    segment: class-index masks [N, H, W] (0 = background, c + 1 = class c).
    """
    adapter = get_task(task)
    device = prepare(model, settings)
    dtype = amp_dtype(settings, device)
    model.eval()
    mean_t, std_t = _normalizer(mean, std, device)
    outputs: list[Any] = []
    for start in range(0, len(images), batch_size):
        chunk = normalize(images[start:start + batch_size].to(device), mean_t, std_t, settings.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = adapter.outputs(model, chunk)
        if task == "detect":
            outputs += [{k: v.cpu() for k, v in item.items()} for item in out]
        else:
            outputs.append(adapter.decode(out.float()).cpu() if task == "classify" else out.cpu())
    if task == "detect":
        return outputs
    if not outputs:
        return torch.zeros((0,), dtype=torch.float32)
    return torch.cat(outputs)
