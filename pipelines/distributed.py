"""Final training on several workers: the one engine under Ray Train's `TorchTrainer` (DDP: gloo on the CPU,
NCCL on GPUs).

`train.workers: N` > 1 runs `pipelines.engine.fit` in N Ray Train workers, on a local Ray or on the cluster
at RAY_ADDRESS / `search.ray_address` (pipelines/cluster.py). Every worker draws the same batch order and
takes 1/N of each global batch of `train.<task>.batch_size` (the engine's `shard`), DDP averages the
gradients, so N workers take the steps one process would. Rank 0 alone logs each epoch's metrics to the
training's MLflow run and reports the epoch's checkpoint (the engine's last.pt) to Ray Train, which keeps it
in `search.storage` (default ./ray_results) as `train-<task>-<resume key>`: rerun with the same inputs, a
stopped run resumes from its last epoch there. The driver reads the last checkpoint's run state (the best
epoch's weights and the history) and goes on as after a one-process `fit`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from pipelines import cluster, scratch, tracking
from pipelines.engine import CHECKPOINT, EpochResult, FitResult, RunState, fit
from pipelines.errors import ConvForgeError
from pipelines.params import Params

if TYPE_CHECKING:
    from pipelines.training import TrainingJob

# Read by the driver and passed on by Ray Train to its workers: rank 0's lines printed once (Ray Train's print
# patch would log each a second time).
TRAIN_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


@dataclass(frozen=True)
class Workers:
    """Where the final training runs: `count` Ray Train workers (1: in this process), on GPUs or not."""

    count: int
    use_gpu: bool | str  # auto: when train.device is not cpu and the cluster has GPUs
    device: str
    address: str | None
    storage: str

    @classmethod
    def from_params(cls, params: Params) -> "Workers":
        return cls(params.train.workers, params.train.use_gpu, params.train.device, params.search.ray_address,
                   params.search.storage or str(tracking.workspace_root(Path.cwd()) / "ray_results"))

    def gpus(self) -> bool:
        """Whether each worker gets a GPU, decided on the connected cluster; one line when it cannot hold the
        workers (Ray Train would wait for them forever)."""
        import ray

        have = ray.cluster_resources()
        gpu = bool(self.use_gpu) if self.use_gpu != "auto" else self.device != "cpu" and have.get("GPU", 0) >= 1
        for resource in ("CPU", "GPU") if gpu else ("CPU",):
            if have.get(resource, 0) < self.count:
                raise ConvForgeError(f"train.workers is {self.count}, but the Ray cluster has "
                                     f"{have.get(resource, 0):g} {resource}(s) for them (one each); "
                                     f"lower train.workers or add nodes")
        return gpu


def check(job: "TrainingJob") -> None:
    """What DDP cannot do with this job, as one line."""
    if job.cfg.freeze and job.cfg.unfreeze_epoch:
        raise ConvForgeError(f"train.{job.task}: unfreeze_epoch with train.workers > 1: DDP fixes the parameters it "
                             "averages when training starts; set unfreeze_epoch to 0 or train.workers to 1")


def restore(checkpoint: Any, work: Path) -> None:
    """Ray Train's latest checkpoint (a resumed run) as the engine's last.pt in `work`."""
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            shutil.copy2(Path(folder) / CHECKPOINT, work / CHECKPOINT)


def worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the engine's `fit` on this worker's share of each batch, its model wrapped in DDP."""
    import ray.train
    import ray.train.torch

    cluster.quiet_sigterm_exit()
    job, run_id = config["job"], config["run_id"]
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the engine's "cuda" is then this worker's GPU
    settings = replace(job.settings, device=device.type)
    if rank == 0:
        tracking.use_store(config["tracking_uri"])
    with scratch.folder("convforge-worker-") as work:
        restore(ray.train.get_checkpoint(), work)

        def on_epoch(result: EpochResult) -> None:
            metrics = {**result.metrics, "epoch": result.epoch, "score": result.score}
            if rank == 0:
                tracking.log_metrics(result.metrics, step=result.epoch, run_id=run_id)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(work))
            else:
                ray.train.report(metrics)  # every worker reports: it is Ray Train's barrier

        fit(job.model, job.task, job.train, job.val, job.cfg, settings, policy=job.policy, checkpoint_dir=work,
            on_epoch=on_epoch, log=print if rank == 0 else None, wrap=ray.train.torch.prepare_model)


def fit_result(job: "TrainingJob", checkpoint: Any) -> FitResult:
    """The run state of the last checkpoint as `fit` returns it: the model with its best epoch's weights."""
    if checkpoint is None:
        raise ConvForgeError(f"train {job.task}: Ray Train finished without a checkpoint")
    with checkpoint.as_directory() as folder:
        saved = torch.load(Path(folder) / CHECKPOINT, map_location="cpu", weights_only=True)
    state = RunState(**{f.name: saved[f.name] for f in fields(RunState)})
    state.history = [EpochResult(**entry) for entry in state.history]
    if state.best_state is not None:
        job.model.load_state_dict(state.best_state)
    job.model.eval()
    return FitResult(job.model, state.history, state.best_epoch, state.best_score, job.metric, state.images_per_s())


def failure_line(exc: Exception) -> str:
    """The first worker's error in one line (a ConvForgeError's own message)."""
    failures = getattr(exc, "worker_failures", None) or {}
    for error in failures.values():
        cause = getattr(error, "cause", None) or error
        if isinstance(cause, ConvForgeError):
            return str(cause)
    first = next(iter(failures.values()), exc)
    lines = [line for line in str(first).splitlines() if line.strip()]
    return lines[-1] if lines else type(first).__name__


def process_group_backend(gpu: bool) -> str:
    """torch.distributed's backend per device type. On GPUs NCCL carries the gradients, and gloo what stays on the
    CPU: the metrics' states (torchmetrics gathers them at compute) and AveragedModel's step count, which NCCL
    (CUDA tensors only) refuses with 'No backend type associated with device type cpu'."""
    return "cpu:gloo,cuda:nccl" if gpu else "gloo"


def fit_on_workers(job: "TrainingJob", workers: Workers, run_id: str, name: str,
                   log: Callable[[str], None] = print) -> FitResult:
    """Train `job` on `workers.count` Ray Train workers; its epochs go to MLflow run `run_id` (from rank 0)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    check(job)
    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    started = cluster.connect(workers.address, log=log)
    try:
        cluster.require_shared(f"train {job.task}", tracking.tracking_uri(), workers.storage, workers.address)
        gpu = workers.gpus()
        log(f"train {job.task}: {workers.count} Ray Train workers on {'GPUs' if gpu else 'CPUs'} (DDP), global batch "
            f"{job.cfg.batch_size}; checkpoints in {workers.storage}/{name}")
        trainer = TorchTrainer(worker_loop, train_loop_config={"job": job, "run_id": run_id,
                                                               "tracking_uri": tracking.tracking_uri()},
                               scaling_config=ScalingConfig(num_workers=workers.count, use_gpu=gpu),
                               torch_config=TorchConfig(backend=process_group_backend(gpu)),
                               run_config=RunConfig(name=name, storage_path=workers.storage))
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise ConvForgeError(f"train {job.task}: a Ray Train worker failed: {failure_line(exc)}") from None
        fitted = fit_result(job, result.checkpoint)
        folder = cluster.folder_of(workers.storage)
        if folder is not None:  # done: a rerun trains anew, as a one-process run does
            shutil.rmtree(folder / name, ignore_errors=True)
        return fitted
    finally:
        if started:
            ray.shutdown()
