"""The one training loop for every task: `fit`, `evaluate` and `predict` over in-memory uint8 tensors.

A task differs only by its adapter (pipelines/tasks.py). Without per-sample augmentation a batch
is a slice of the in-memory tensors (normalized on the device); with it, a DataLoader applies the
torchvision.transforms.v2 policy per sample. On CUDA: AMP (bf16 where the GPU has it, else fp16
with loss scaling), pinned memory and one batch of copy-ahead; everywhere: channels_last, optional
torch.compile, a checkpoint per epoch to resume from, and a deterministic mode in which two CPU runs
give identical metrics (pipelines/runtime.py `resolve` decides all of it from the machine's facts).
The learning rate is a function of the step (pipelines/optim.py), so resuming needs only the step.
Under DDP (Ray Train's workers, pipelines/distributed.py) each worker takes its share of every batch
(`shard`) and the workers agree on BatchNorm statistics after each epoch (`agree`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from models._checkpoint import BATCH_NORMS, train_mode, trunk_parameters
from pipelines.errors import ConvForgeError
from pipelines.optim import lr_at, make_ema, make_optimizer, set_hyperparameters, stages_frozen
from pipelines.params import PolicyParams, TrainConfig
from pipelines import runtime
from pipelines.runtime import DeviceChoice, set_threads
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
    num_workers: int | str = 0  # DataLoader workers, or "auto" (see `loader_workers`)
    deterministic: bool = True
    seed: int = 0
    concurrent_runs: int = 1  # runs sharing this machine's cores (a search's concurrent trials)

    @classmethod
    def from_params(cls, params: "Params", concurrent_runs: int = 1) -> "EngineSettings":
        """The settings of params.yaml's `train` section plus the global seed and determinism;
        `concurrent_runs` is how many runs share the cores (what `num_workers: auto` divides)."""
        train = params.train
        return cls(device=train.device, amp=train.amp, channels_last=train.channels_last, compile=train.compile,
                   num_threads=train.num_threads, num_workers=train.num_workers,
                   deterministic=params.deterministic, seed=params.seed, concurrent_runs=max(1, concurrent_runs))

    def choice(self) -> DeviceChoice:
        """Device, AMP, memory format and determinism these settings get on this machine."""
        return runtime.resolve(self.device, self.amp, self.channels_last, self.deterministic, runtime.probe())

    def recorded(self) -> dict[str, Any]:
        """The settings as a run records them: device, amp and channels_last as resolved (not `auto`)."""
        chosen = self.choice()
        return {**asdict(self), "device": chosen.device, "amp": chosen.amp, "channels_last": chosen.channels_last}


COMPUTING_KEYS = ("device", "amp", "channels_last", "compile")  # engine settings that change what a step computes


def computing(engine: dict[str, Any]) -> dict[str, Any]:
    """The engine settings (resolved, as `EngineSettings.recorded` gives them) that change what training computes:
    bf16 or float32 steps, another device, memory format or compiled kernels give other scores. A search or an
    interrupted training is only resumed under the same ones."""
    return {key: engine[key] for key in COMPUTING_KEYS}


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


def amp_dtype(settings: EngineSettings) -> torch.dtype | None:
    """The autocast dtype of training steps. auto: bf16 on GPUs that have it, else fp16 (with loss scaling), off
    on the CPU; bf16/fp16 force it; off turns it off (`runtime.resolve` decides).
    Validation, evaluation and prediction run in float32, as the service does: a score is the served one."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.choice().amp)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Mixed precision in `dtype` on `device`; a no-op when `dtype` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def prepare(model: nn.Module, settings: EngineSettings) -> torch.device:
    """Threads, determinism, device and memory format for a run; returns the device."""
    if settings.num_threads > 0:
        set_threads(settings.num_threads)
    chosen = settings.choice()
    if settings.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    # CPU: every op's deterministic kernel; CUDA: cuDNN's only (see pipelines/runtime.py for why)
    runtime.apply_determinism(chosen)
    device = torch.device(chosen.device)
    model.to(device)
    if chosen.channels_last:
        model.to(memory_format=torch.channels_last)
    return device


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


MAX_AUTO_WORKERS = 8  # past this, reading and augmenting small images stops paying for the processes


def loader_workers(settings: EngineSettings, data: Any, per_sample_on_gpu: bool = False) -> int:
    """DataLoader workers for `data`: the count in the settings, or with "auto" 0 for in-memory tensors
    (slicing beats any worker) and else one per core this run's share leaves beside its training process.
    `per_sample_on_gpu`: in-memory items augmented one by one for a GPU, which waits on them: workers too
    (on the CPU, 0 keeps a run's augmentation independent of the core count)."""
    from pipelines.datasets import is_lazy

    if settings.num_workers != "auto":
        return int(settings.num_workers)
    if not is_lazy(data) and not per_sample_on_gpu:
        return 0
    share = len(os.sched_getaffinity(0)) // max(1, settings.concurrent_runs)
    return max(0, min(MAX_AUTO_WORKERS, share - 1)) if share > 1 else 0


def _loader(dataset: torch.utils.data.Dataset, workers: int, pin: bool, **options: Any) -> torch.utils.data.DataLoader:
    """A DataLoader whose workers start once per loader and read ahead two batches each."""
    return torch.utils.data.DataLoader(dataset, num_workers=workers, pin_memory=pin,
                                       prefetch_factor=2 if workers else None, **options)


class _Batches(torch.utils.data.Dataset):
    """Whole batches of a lazily read split, by their index lists: the slicing path, run in DataLoader
    workers (same batches, same order, as slicing in-memory tensors)."""

    def __init__(self, task: Any, data: Any, chunks: list[Tensor]):
        self.task, self.data, self.chunks = task, data, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, b: int) -> Batch:
        return self.task.gather(self.data, self.chunks[b])


class _Samples(torch.utils.data.Dataset):
    """Per-sample augmented items of a split, tensors or read lazily (the DataLoader path)."""

    def __init__(self, task: Any, data: Any, augment: Callable):
        self.task, self.data, self.augment = task, data, augment

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Tensor, Any]:
        return self.task.item(self.data, i, self.augment)

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Any]]:
        """A batch's items (the DataLoader's batched fetch): gathered and augmented as one tensor where the
        augmentation has a whole-batch form (`CropFlip.batch`: the same output as item by item) and the task's
        items are augmented images beside untouched targets (`whole_batch_augment`); else one by one."""
        whole = getattr(self.augment, "batch", None)
        if whole is None or not self.task.whole_batch_augment:
            return [self[i] for i in indices]
        batch = self.task.gather(self.data, torch.as_tensor(indices))
        return list(zip(whole(batch.images).unbind(0), batch.targets.unbind(0)))


def batches_per_epoch(total: int, batch_size: int, world: int = 1) -> int:
    """Batches per epoch; a last batch that would leave one of `world` workers a single item is dropped (batch
    norm cannot train on one)."""
    full, rest = divmod(total, batch_size)
    return full + (1 if rest >= 2 * world else 0) if total > 1 else total


def shard() -> tuple[int, int]:
    """(rank, world size) inside a DDP process group (Ray Train's workers); (0, 1) in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def train_batches(task: Any, data: Any, batch_size: int, generator: torch.Generator, augment: Callable | None,
                  settings: EngineSettings, pin: bool) -> Iterator[Batch]:
    """One epoch of shuffled CPU batches: slices of the tensors (read by DataLoader workers when the split
    is lazy), or per-sample augmented through a DataLoader. Under DDP every worker draws the same order and
    takes its share of each global batch, so N workers step on the batches one process would."""
    rank, world = shard()
    count = batches_per_epoch(len(data), batch_size, world)
    workers = loader_workers(settings, data, per_sample_on_gpu=augment is not None and pin)
    if augment is None or world > 1:
        order = torch.randperm(len(data), generator=generator)
        chunks = [order[b * batch_size:(b + 1) * batch_size][rank::world] for b in range(count)]
        if augment is not None:
            yield from _loader(_Samples(task, data, augment), workers, pin,
                               batch_sampler=[chunk.tolist() for chunk in chunks], collate_fn=task.collate)
            return
        if workers == 0 or not _lazy(data):  # tensors in memory: slicing beats any worker
            yield from (task.gather(data, chunk) for chunk in chunks)
            return
        yield from _loader(_Batches(task, data, chunks), workers, pin, batch_size=None)
        return
    yield from _loader(_Samples(task, data, augment), workers, pin, batch_size=batch_size, shuffle=True,
                       generator=generator, collate_fn=task.collate,
                       drop_last=len(data) % batch_size == 1 and len(data) > 1)


def eval_batches(task: Any, data: Any, batch_size: int, settings: EngineSettings | None = None) -> Iterator[Batch]:
    """The split in order, as CPU batches (read by DataLoader workers when the split is lazy)."""
    chunks = [torch.arange(start, min(start + batch_size, len(data))) for start in range(0, len(data), batch_size)]
    workers = loader_workers(settings or EngineSettings(num_workers="auto"), data)
    if workers == 0 or not _lazy(data):
        yield from (task.gather(data, chunk) for chunk in chunks)
        return
    yield from _loader(_Batches(task, data, chunks), workers, False, batch_size=None)


def _lazy(data: Any) -> bool:
    from pipelines.datasets import is_lazy

    return is_lazy(data)


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


RESIDENT_SHARE = 0.25  # of a run's share of the GPU's free memory: the most its resident data may take


def fits_resident(size: int, free: int, sharing: int) -> bool:
    """Whether `size` bytes of data may live on a GPU with `free` bytes free, shared by `sharing` runs (a search's
    concurrent trials, which may all see the same free memory as they start)."""
    return size <= RESIDENT_SHARE * free / max(1, sharing)


def resident(data: Any, device: torch.device, sharing: int = 1) -> Any:
    """On CUDA, the dataset's uint8 images (and masks) on the GPU when they fit easily (`fits_resident`); else
    unchanged (always for a split read lazily from disk: it is large by construction)."""
    from dataclasses import replace

    if device.type != "cuda" or _lazy(data):
        return data
    size = data.images.numel() + (data.masks.numel() if hasattr(data, "masks") else 0)
    if not fits_resident(size, torch.cuda.mem_get_info(device)[0], sharing):
        return data
    moved = {"images": data.images.to(device)}
    if hasattr(data, "labels"):
        moved["labels"] = data.labels.to(device)
    if hasattr(data, "masks"):
        moved["masks"] = data.masks.to(device)
    return replace(data, **moved)


# ---------------------------------------------------------------- one run's parts and state


@dataclass
class Setup:
    """What one `fit` trains with, built once from the model, the task, the data and the settings."""

    model: nn.Module
    forward_model: nn.Module  # the model, compiled when the settings ask and the task allows
    adapter: Any
    optimizer: torch.optim.Optimizer
    ema: torch.optim.swa_utils.AveragedModel | None
    scaler: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype | None  # autocast's, None when off
    mean: Tensor
    std: Tensor
    augment: Callable | None
    mixer: Callable | None
    data: Any  # the training split, on the GPU when it fits and nothing augments it per sample
    channels_last: bool
    held: list[nn.Parameter] = field(default_factory=list)  # the `freeze` stages', trainable from unfreeze_epoch

    @property
    def eval_model(self) -> nn.Module:
        """The weights to validate, keep and return: the EMA's when EMA is on."""
        return self.ema.module if self.ema is not None else self.model


def set_up(model: nn.Module, task: str, train: Any, cfg: TrainConfig, settings: EngineSettings,
           policy: PolicyParams | None, wrap: Callable[[nn.Module], nn.Module] | None = None) -> Setup:
    """Device, optimizer, EMA, loss scaler, normalization, augmentation and mixing for training on `train`;
    `wrap` makes the module the loss calls (Ray Train's DDP `prepare_model`)."""
    adapter = get_task(task)
    device = prepare(model, settings)
    dtype = amp_dtype(settings)
    if len(train) < 2:
        raise ConvForgeError(f"{task}: the training split has {len(train)} item(s); need at least 2")
    held = trunk_parameters(model, cfg.freeze)
    for parameter in held:  # not trainable until set_trainable releases them; the optimizer holds them at lr 0
        parameter.requires_grad_(False)
    wrapped = wrap(model) if wrap is not None else model  # after freezing: DDP reduces the trainable parameters
    forward_model = torch.compile(wrapped) if settings.compile and adapter.compiles else wrapped
    optimizer = make_optimizer(model, cfg, held)
    ema = make_ema(model, cfg.ema_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.choice().grad_scaler)  # bf16 needs no loss scaling
    mean, std = _normalizer(train.mean, train.std, device)
    augment = adapter.augmenter(train, policy, cfg.aug_strength)
    mixer = adapter.mixer(cfg, len(train.classes))
    data = resident(train, device, settings.concurrent_runs) if augment is None else train
    return Setup(model, forward_model, adapter, optimizer, ema, scaler, device, dtype, mean, std, augment, mixer, data,
                 settings.choice().channels_last, held)


def set_trainable(setup: Setup, cfg: TrainConfig, epoch: int) -> None:
    """Train mode for `epoch`: the `freeze` stages held (no gradients, BN statistics fixed) until unfreeze_epoch,
    then fine-tuned with the rest (gradual unfreezing, Howard & Ruder 2018); a pure function of (cfg, epoch),
    so a resumed run is in the state the uninterrupted one was."""
    frozen = stages_frozen(cfg, epoch)
    for parameter in setup.held:
        parameter.requires_grad_(not frozen)
    train_mode(setup.model)


@dataclass
class RunState:
    """Where a run stands after an epoch; the checkpoint holds it, and `resume` goes on from it."""

    epoch: int = 0  # epochs done
    step: int = 0  # optimizer steps done: the learning rate's position in its schedule
    history: list[EpochResult] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    best_state: dict[str, Tensor] | None = None  # the best epoch's weights, on the CPU
    bad_epochs: int = 0  # epochs since the best one

    def record(self, result: EpochResult, steps: int, model: nn.Module) -> None:
        """Adds a finished epoch of `steps` steps; keeps `model`'s weights when it scored best so far."""
        self.epoch, self.step = result.epoch, self.step + steps
        self.history.append(result)
        if result.score > self.best_score:
            self.best_score, self.best_epoch, self.best_state, self.bad_epochs = (
                result.score, result.epoch, _cpu_state(model), 0)
        else:
            self.bad_epochs += 1

    def stopped_early(self, cfg: TrainConfig) -> bool:
        """Whether validation has not improved for `cfg.early_stop_patience` epochs (0: never stop early)."""
        return cfg.early_stop_patience > 0 and self.bad_epochs >= cfg.early_stop_patience

    def done(self, cfg: TrainConfig) -> bool:
        """Whether the run has trained every epoch of `cfg` or stopped early."""
        return self.epoch >= cfg.epochs or self.stopped_early(cfg)

    def images_per_s(self) -> float:
        """Training throughput over every epoch so far, validation excluded."""
        seconds = sum(r.metrics["epoch_s"] for r in self.history)
        images = sum(r.metrics["images_per_s"] * r.metrics["epoch_s"] for r in self.history)
        return images / seconds if seconds > 0 else 0.0

    def eta_s(self, cfg: TrainConfig) -> float:
        """Seconds left at the mean wall time (training and validation) of the epochs so far."""
        if self.stopped_early(cfg):
            return 0.0
        wall = sum(r.metrics.get("wall_s", r.metrics["epoch_s"]) for r in self.history)
        return (cfg.epochs - self.epoch) * wall / len(self.history)


def save_checkpoint(path: Path, setup: Setup, state: RunState, cfg: TrainConfig) -> None:
    """The run state with the weights, optimizer, scaler and EMA: tensors and plain values only, written
    atomically, so `torch.load(weights_only=True)` reads it and an interruption never leaves half a file."""
    checkpoint = {**vars(state), "history": [asdict(r) for r in state.history], "cfg": cfg.model_dump(),
                  "model": setup.model.state_dict(), "optimizer": setup.optimizer.state_dict(),
                  "scaler": setup.scaler.state_dict(), "ema": setup.ema.state_dict() if setup.ema is not None else None}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def resume(path: Path | None, setup: Setup, cfg: TrainConfig, say: Callable[[str], None]) -> RunState:
    """The state saved at `path`, with the run's weights, optimizer, scaler and EMA restored; a new state without one.

    The optimizer keeps its moments; its hyperparameters come from `cfg` at every step (a tuner may change them).
    """
    if path is None or not path.is_file():
        return RunState()
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if "step" not in saved:
        raise ConvForgeError(f"{path}: a checkpoint of an older engine; delete it to train from the start")
    setup.model.load_state_dict(saved["model"])
    try:
        setup.optimizer.load_state_dict(saved["optimizer"])
    except ValueError as exc:  # another number of param groups: `freeze` went from 0 to N or back
        raise ConvForgeError(f"{path}: saved with freeze {saved['cfg'].get('freeze')}, now {cfg.freeze}, and its "
                             f"optimizer does not fit ({exc}); delete it to train from the start") from None
    if saved["scaler"]:  # empty from a run without loss scaling (CPU, bf16, amp off): an fp16 run starts a new scale
        setup.scaler.load_state_dict(saved["scaler"])
    if setup.ema is not None and saved["ema"] is not None:
        setup.ema.load_state_dict(saved["ema"])
    state = RunState(**{f.name: saved[f.name] for f in fields(RunState)})
    state.history = [EpochResult(**entry) for entry in state.history]
    changed = ", ".join(f"{k} {saved['cfg'].get(k)} -> {v}" for k, v in cfg.model_dump().items()
                        if saved["cfg"].get(k) != v)
    say(f"resuming {setup.adapter.name} at epoch {state.epoch + 1}"
        + (f" with changed config: {changed}" if changed else ""))
    return state


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of the weights, in the standard memory format (safetensors wants contiguous)."""
    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for k, v in module.state_dict().items()}


# ---------------------------------------------------------------- the loop


def agree(setup: Setup, loss: float, seen: int) -> tuple[float, int]:
    """Under DDP: rank 0's BatchNorm statistics on every worker (each updated its own on its share), so all
    evaluate, select and stop alike; and the epoch's loss and images over all workers. One process: unchanged.

    Every worker then validates on the whole split: torchmetrics sums its states over the workers, which
    repeats each item world-size times and leaves every ratio (accuracy, F1, ECE, mAP) as it is."""
    if shard()[1] == 1:
        return loss, seen
    for module in (setup.model, setup.ema):
        for buffer in module.buffers() if module is not None else ():
            torch.distributed.broadcast(buffer.data, 0)
    totals = torch.tensor([loss * seen, float(seen)], dtype=torch.float64, device=setup.device)
    torch.distributed.all_reduce(totals)
    return float(totals[0] / totals[1]), int(totals[1])


def seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Seeds everything random in an epoch (order, augmentation, dropout, mixup) from (seed, epoch), so a
    resumed run repeats the uninterrupted one exactly; returns the generator that shuffles the epoch."""
    epoch_seed = (seed * 1_000_003 + epoch) % (2**63)
    torch.manual_seed(epoch_seed)
    return torch.Generator().manual_seed(epoch_seed)


def train_one_epoch(setup: Setup, batches: Iterable[Batch], cfg: TrainConfig, epoch: int, first_step: int,
                    steps: int, say: Callable[[str], None]) -> tuple[float, int, float]:
    """One epoch of optimizer steps from `first_step` on; returns the mean loss, the images seen and the seconds."""
    set_trainable(setup, cfg, epoch)
    started = last_note = time.perf_counter()
    loss_sum = torch.zeros((), device=setup.device)  # summed on the device: no sync per step
    seen = 0
    for i, batch in enumerate(prefetch(batches, setup.device), 1):
        set_hyperparameters(setup.optimizer, first_step + i - 1, cfg, steps)
        images = normalize(batch.images, setup.mean, setup.std, setup.channels_last)
        with _autocast(setup.device, setup.dtype):
            loss = setup.adapter.loss(setup.forward_model, images, batch.targets, cfg, setup.mixer)
        setup.optimizer.zero_grad(set_to_none=True)
        setup.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            setup.scaler.unscale_(setup.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(setup.model.parameters(), cfg.grad_clip)
        setup.scaler.step(setup.optimizer)
        setup.scaler.update()
        if setup.ema is not None:
            setup.ema.update_parameters(setup.model)
        loss_sum += loss.detach() * len(batch)
        seen += len(batch)
        now = time.perf_counter()
        if now - last_note > PROGRESS_EVERY_S:
            last_note = now
            say(f"epoch {epoch}/{cfg.epochs}: {i}/{steps} batches, loss {float(loss_sum) / seen:.4f}, "
                f"{seen / (now - started):.0f} img/s")
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
    return float(loss_sum) / max(1, seen), seen, time.perf_counter() - started


@torch.no_grad()
def recalibrate_bn(setup: Setup, train: Any, cfg: TrainConfig, settings: EngineSettings) -> None:
    """Precise BatchNorm statistics (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm") for a validation.

    Each BN layer that trained this epoch gets the plain average of its batch statistics over
    `cfg.precise_bn` training items (un-augmented, the same seeded ones every epoch), in place of the running
    average, which lags the weights by about 1/momentum steps. Early in a run, at a search's first rung, that
    lag leaves a deep net near chance on validation although its weights have learned, and trials then rank
    by how fast their statistics settle. Layers of frozen stages keep theirs; training never reads them.
    """
    if cfg.precise_bn <= 0:
        return
    trained = {name for name, m in setup.model.named_modules() if isinstance(m, BATCH_NORMS) and m.training}
    model = setup.eval_model
    norms = [m for name, m in model.named_modules() if name in trained]
    if not norms:
        return
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
        m.train()
    try:
        items = train.subset(cfg.precise_bn, settings.seed)
        for batch in prefetch(eval_batches(setup.adapter, items, cfg.batch_size, settings), setup.device):
            if len(batch) < 2:  # BN in training mode needs two values per channel
                continue
            images = normalize(batch.images, setup.mean, setup.std, setup.channels_last)
            setup.adapter.outputs(model, images)  # float32: the statistics of the served model's activations
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            m.eval()


def fit(model: nn.Module, task: str, train: Any, val: Any, cfg: TrainConfig, settings: EngineSettings, *,
        policy: PolicyParams | None = None, checkpoint_dir: Path | None = None,
        on_epoch: Callable[[EpochResult], None] | None = None,
        log: Callable[[str], None] | None = print, wrap: Callable[[nn.Module], nn.Module] | None = None) -> FitResult:
    """Train `model` on `train`, select the best epoch on `val`; resumes from `checkpoint_dir/last.pt` if present.

    `on_epoch` runs after the epoch's checkpoint is written (a tuner may report and copy it); `wrap`: see `set_up`.
    """
    say = log or (lambda message: None)
    setup = set_up(model, task, train, cfg, settings, policy, wrap)
    say(runtime.device_line(settings.choice(), runtime.probe()))
    path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    state = resume(path, setup, cfg, say)
    steps = batches_per_epoch(len(train), cfg.batch_size, shard()[1])
    while not state.done(cfg):
        epoch = state.epoch + 1
        generator = seed_epoch(settings.seed, epoch)
        started = time.perf_counter()
        batches = train_batches(setup.adapter, setup.data, cfg.batch_size, generator, setup.augment, settings,
                                pin=setup.device.type == "cuda")
        train_loss, seen, epoch_s = train_one_epoch(setup, batches, cfg, epoch, state.step, steps, say)
        train_loss, seen = agree(setup, train_loss, seen)
        if not math.isfinite(train_loss):
            raise ConvForgeError(f"{task}: training diverged in epoch {epoch} (loss {train_loss}); "
                                 f"lower train.{task}.lr (now {cfg.lr})")
        recalibrate_bn(setup, train, cfg, settings)
        report = _evaluate(setup.eval_model, setup.adapter, val, settings, setup.device, cfg.batch_size)
        metrics = {"train_loss": train_loss, **{f"val_{k}": v for k, v in report.scalars.items()},
                   "lr": lr_at(state.step + steps, cfg, steps),  # the rate the next epoch starts at
                   "images_per_s": seen / epoch_s,
                   "epoch_s": epoch_s, "wall_s": time.perf_counter() - started}
        result = EpochResult(epoch, metrics, report.scalars[setup.adapter.metric])
        state.record(result, steps, setup.eval_model)
        if path is not None:
            save_checkpoint(path, setup, state, cfg)
        say(f"epoch {epoch}/{cfg.epochs}  loss {train_loss:.4f}  {PRIMARY[task]} {result.score:.4f}  "
            f"lr {metrics['lr']:.2e}  {metrics['images_per_s']:.0f} img/s  {epoch_s:.1f} s  "
            f"ETA {state.eta_s(cfg):.0f} s" + ("  (early stop)" if state.stopped_early(cfg) else ""))
        if on_epoch is not None:
            on_epoch(result)
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    model.to(memory_format=torch.contiguous_format)  # plain tensors for saving and export
    for parameter in setup.held:  # the model goes back as trainable as it came
        parameter.requires_grad_(True)
    model.eval()
    return FitResult(model, state.history, state.best_epoch, state.best_score, PRIMARY[task], state.images_per_s())


# ---------------------------------------------------------------- evaluation and prediction


@torch.inference_mode()
def _evaluate(model: nn.Module, adapter: Any, data: Any, settings: EngineSettings, device: torch.device,
              batch_size: int, meter: Any = None) -> "MetricReport":
    """The adapter's metric report of `model` on a split (into `meter`, else the task's default one), in
    order and without gradients."""
    model.eval()
    mean, std = _normalizer(data.mean, data.std, device)
    meter = adapter.meter(data.classes) if meter is None else meter
    for batch in prefetch(eval_batches(adapter, data, batch_size, settings), device):
        images = normalize(batch.images, mean, std, settings.choice().channels_last)
        outputs = adapter.outputs(model, images)  # float32, as served (no autocast)
        adapter.update(meter, outputs, batch)
    return meter.compute()


def evaluate_report(model: nn.Module, task: str, data: Any, settings: EngineSettings,
                    batch_size: int = 64, meter: Any = None) -> "MetricReport":
    """Every metric of `task` on a split: scalars, per-class values, confusion matrix, PR curve; `meter`:
    the task adapter's meter made with the model's own settings (default: `adapter.meter(classes)`)."""
    device = prepare(model, settings)
    return _evaluate(model, get_task(task), data, settings, device, batch_size, meter)


def evaluate(model: nn.Module, task: str, data: Any, settings: EngineSettings,
             batch_size: int = 64) -> dict[str, float]:
    """The metrics of `task` on a split as one flat dict (`accuracy`, ..., `per_class/accuracy/<class>`)."""
    return evaluate_report(model, task, data, settings, batch_size).flat()


@torch.inference_mode()
def predict(model: nn.Module, task: str, images: Tensor, mean: Iterable[float], std: Iterable[float],
            settings: EngineSettings, batch_size: int = 64) -> Any:
    """The task adapter's predictions for uint8 images [N, C, H, W], on the CPU.

    Class probabilities [N, C], per-image detections {"boxes" xyxy, "scores", "labels" 0..C-1[, "masks"]},
    or class-index masks [N, H, W] (0 = background, c + 1 = class c).
    """
    adapter = get_task(task)
    device = prepare(model, settings)
    model.eval()
    mean_t, std_t = _normalizer(mean, std, device)
    chunks: list[Any] = []
    for start in range(0, len(images), batch_size):
        chunk = normalize(images[start:start + batch_size].to(device), mean_t, std_t, settings.choice().channels_last)
        outputs = adapter.outputs(model, chunk)  # float32, as served
        chunks.append(adapter.cpu_predictions(outputs))
    return adapter.join(chunks)
