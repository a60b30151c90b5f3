"""What multi-worker training (Ray Train, DDP) asks of the engine's parts, in one process: a torch.distributed group
of one worker on this CPU (gloo), the device types it maps chosen as the GPU backend maps them."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.distributed as dist

from models._registry import REGRESS_TASK, build
from pipelines.distributed import process_group_backend
from pipelines.metrics import ClassifyMeter
from pipelines.optim import make_ema
from pipelines.tasks import get_task


@contextmanager
def process_group(backend: str, store: Path) -> Iterator[None]:
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def as_on_this_cpu(backend: str) -> str:
    """The backend string with NCCL (which needs a GPU to start) replaced by gloo: the same device types mapped."""
    return backend.replace("nccl", "gloo")


def meter_and_ema_sync() -> None:
    """What rank 0 syncs at each validation: the meters' states (on the CPU) and the EMA's buffers."""
    meter = ClassifyMeter(["a", "b", "c"])
    meter.update(torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), torch.tensor([0, 2]))
    assert meter.compute().scalars["accuracy"] == 0.5
    ema = make_ema(torch.nn.Linear(2, 2), 0.9)
    for buffer in ema.buffers():  # AveragedModel's step count lives on the CPU whatever the model's device
        dist.broadcast(buffer.data, 0)


def test_the_gpu_backend_maps_cpu_tensors_too(tmp_path):
    """On GPUs Ray Train picked NCCL alone, which maps CUDA tensors only: the first validation failed in the
    metrics' gather with 'No backend type associated with device type cpu' (as does the EMA's step count at
    each epoch's broadcast). The backend given to Ray maps the CPU to gloo."""
    assert process_group_backend(False) == "gloo"
    gpu = process_group_backend(True)
    assert "cuda:nccl" in gpu.split(",") and "cpu:gloo" in gpu.split(",")
    with process_group(as_on_this_cpu(gpu), tmp_path / "mapped"):
        meter_and_ema_sync()
    with process_group("cuda:gloo", tmp_path / "nccl-alone"), pytest.raises(RuntimeError, match="device type cpu"):
        meter_and_ema_sync()  # NCCL alone (Ray's choice on GPUs): the CPU tensors have no backend


def test_the_regress_loss_runs_under_ddp(tmp_path, project_params):
    """The regression loss read the model's target_std: DDP (Ray Train's prepare_model) does not pass attribute
    lookups to the module it wraps, so every multi-worker regress run stopped with an AttributeError."""
    model = build(REGRESS_TASK, "lenet5", 1, 1, 16, target_mean=[0.0], target_std=[10.0])
    cfg = project_params.train.task(REGRESS_TASK)
    images, targets = torch.randn(8, 1, 16, 16), torch.linspace(-40, 40, 8)[:, None]
    expected = get_task(REGRESS_TASK).loss(model, images, targets, cfg)
    with process_group("gloo", tmp_path / "store"):
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        loss = get_task(REGRESS_TASK).loss(wrapped, images, targets, cfg)
        loss.backward()
    assert torch.allclose(loss, expected)
