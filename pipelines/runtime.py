"""Process set-up every stage shares: no telemetry, seeds, threads, device, atomic writes.

Device resolution is a pure function of the settings and the machine's facts (`Hardware`, read once by
`probe`): `resolve` picks the device, the AMP dtype of training steps (bf16 where the GPU has it, else
fp16 with loss scaling; float32 on the CPU), channels_last and what `deterministic` means there;
`device_line` is the one line a run logs and `device_record` what it records in MLflow. Determinism:
on the CPU every op runs its deterministic kernel (two runs give identical metrics); on CUDA seeds and
cuDNN's deterministic convolutions only, because ops such as bilinear upsampling's and RoIAlign's
backward have no deterministic CUDA kernel and forcing deterministic algorithms there only warns and
slows every other kernel down.
"""

from __future__ import annotations

import functools
import math
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models._files import atomic_dir, sha256_file, write_json  # noqa: F401  (re-exported)

# Only 127.0.0.1 traffic: the stack's usage reporting stays off unless a user turns it on.
TELEMETRY_OFF = {
    "DVC_NO_ANALYTICS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "BENTOML_DO_NOT_TRACK": "True",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
}
for _key, _value in TELEMETRY_OFF.items():
    os.environ.setdefault(_key, _value)


def token_source() -> str | None:
    """Where Ray would read an auth token from in this process (None: nowhere)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return path if Path(path).expanduser().is_file() else None
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def enable_token_auth() -> str | None:
    """RAY_AUTH_MODE=token when RAY_ADDRESS names a `ray start` cluster, the mode is unset and a token is at hand, as
    Ray does itself for a cluster it finds on its own; returns the token's source. A token sent to a cluster without
    authentication is ignored there."""
    address = os.environ.get("RAY_ADDRESS", "")
    if address in ("", "local", "auto") or address.startswith("ray://") or "RAY_AUTH_MODE" in os.environ:
        return None
    source = token_source()
    if source is not None:
        os.environ["RAY_AUTH_MODE"] = "token"
    return source


# Ray reads RAY_AUTH_MODE once, when imported: the token of the cluster at RAY_ADDRESS is picked up before that
# (pipelines/cluster.py joins it).
enable_token_auth()


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; in deterministic mode also pick deterministic kernels (see `resolve`)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    apply_determinism(resolve("auto", "off", False, deterministic, probe()))  # the engine refines it per run


def set_threads(num_threads: int) -> int:
    """Use `num_threads` intra-op threads (0 = every core this process may use); returns the count."""
    import torch

    count = num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(count)
    return count


@dataclass(frozen=True)
class Hardware:
    """The facts device resolution decides from (`probe` reads this machine's)."""

    cores: int  # CPU cores this process may use
    threads: int  # torch's intra-op threads
    gpus: int = 0  # usable CUDA devices
    gpu_name: str = ""
    gpu_memory_gib: float = 0.0
    capability: tuple[int, int] = (0, 0)  # CUDA compute capability of device 0
    bf16: bool = False  # native bf16 (Ampere, capability 8.0, and later)
    cpu_bf16: bool = False  # the CPU's own bf16 instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16)
    cuda_version: str = ""  # of the torch build
    driver_version: str = ""


@dataclass(frozen=True)
class DeviceChoice:
    """How a run uses the hardware: what `resolve` decided."""

    device: str  # cpu | cuda
    amp: str  # bf16 | fp16 | off
    grad_scaler: bool  # fp16 needs loss scaling; bf16 has float32's range
    channels_last: bool
    deterministic: str  # off | kernels (CPU: every op deterministic) | cudnn (CUDA: seeds + cuDNN's convolutions)


@functools.lru_cache(maxsize=1)
def probe() -> Hardware:
    """This machine's facts: cores and threads, and the first GPU's name, memory, capability and versions."""
    import torch

    cores, threads, cpu_bf16 = len(os.sched_getaffinity(0)), torch.get_num_threads(), _cpu_has_bf16()
    if not torch.cuda.is_available():
        return Hardware(cores, threads, cpu_bf16=cpu_bf16)
    props = torch.cuda.get_device_properties(0)
    return Hardware(cores, threads, torch.cuda.device_count(), props.name, round(props.total_memory / 2**30, 1),
                    (props.major, props.minor), torch.cuda.is_bf16_supported(including_emulation=False),
                    cpu_bf16, torch.version.cuda or "", _driver_version())


CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # /proc/cpuinfo: x86's two, Arm's (FEAT_BF16)
CPUINFO = Path("/proc/cpuinfo")


def cpu_info(key: str, cpuinfo: Path = CPUINFO) -> str | None:
    """The first CPU's `key` field in Linux's /proc/cpuinfo ("model name", "flags", ...); None where there is none."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return None


def _cpu_has_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU multiplies bf16 natively (its flags: x86's `flags`, Arm's `Features`). Without these
    instructions oneDNN emulates bf16: `amp: bf16` then trains slower, not faster."""
    flags = cpu_info("flags", cpuinfo) or cpu_info("Features", cpuinfo) or ""
    return bool(CPU_BF16_FLAGS & set(flags.split()))


def _driver_version() -> str:
    """The NVIDIA driver's version as nvidia-smi reports it ("" without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.strip().splitlines()[0] if out.strip() else ""


def resolve(device: str, amp: str, channels_last: bool, deterministic: bool, hw: Hardware,
            section: str = "train") -> DeviceChoice:
    """The device, AMP dtype, memory format and determinism that settings (`section`'s) get on `hw`.

    auto: CUDA when a GPU is usable; AMP bf16 where the GPU has it natively, else fp16 with a GradScaler, off on
    the CPU: there bf16 (`amp: bf16`) trains dense convolutions 1.2-1.7x faster on a CPU with bf16 instructions
    but depthwise ones (MobileNetV2, EfficientNet) 2x slower, and without those instructions it is emulated
    (bench/cpu_amp.py). channels_last only where it pays: the CPU and GPUs with tensor cores (capability 7.0 and later).
    """
    from pipelines.errors import ConvForgeError

    if device == "cuda" and hw.gpus == 0:
        raise ConvForgeError(f"{section}.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    on_cuda = device == "cuda" or (device == "auto" and hw.gpus > 0)
    if amp == "auto":
        amp = ("bf16" if hw.bf16 else "fp16") if on_cuda else "off"
    if amp == "fp16" and not on_cuda:
        raise ConvForgeError(f"{section}.amp fp16 needs CUDA; use bf16 or off on the CPU")
    if amp == "bf16" and on_cuda and not hw.bf16:
        raise ConvForgeError(f"{section}.amp bf16: {hw.gpu_name} (compute capability {hw.capability[0]}."
                             f"{hw.capability[1]}) has no native bf16; use auto or fp16")
    mode = "off" if not deterministic else ("cudnn" if on_cuda else "kernels")
    return DeviceChoice("cuda" if on_cuda else "cpu", amp, amp == "fp16",
                        channels_last and (not on_cuda or hw.capability >= (7, 0)), mode)


# Deterministic kernels in torch also fill every new tensor with NaN by default, which only shows reads of uninitialized
# memory: no op of a run makes one (tests/pipelines/test_engine.py trains the default families with the fill on and off
# to the same bits), and it cost a CPU training step of the default models 5-15% in three runs of bench/determinism.py.
FILL_UNINITIALIZED_MEMORY = False


def apply_determinism(choice: DeviceChoice) -> None:
    """Deterministic kernels as `choice` says (process-wide settings of torch)."""
    import torch

    torch.use_deterministic_algorithms(choice.deterministic == "kernels", warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = FILL_UNINITIALIZED_MEMORY
    torch.backends.cudnn.deterministic = choice.deterministic == "cudnn"
    torch.backends.cudnn.benchmark = choice.deterministic == "off"  # autotuning picks kernels by timing


def device_line(choice: DeviceChoice, hw: Hardware) -> str:
    """One line: the hardware a run uses and how."""
    emulated = " (emulated: this CPU has no bf16 instructions)" if choice.device == "cpu" and choice.amp == "bf16" \
        and not hw.cpu_bf16 else ""
    how = f"amp {choice.amp}{' + loss scaling' if choice.grad_scaler else ''}{emulated}, " \
          f"{'channels_last' if choice.channels_last else 'contiguous'}, deterministic {choice.deterministic}"
    if choice.device == "cpu":
        return f"device: cpu ({hw.cores} cores, {hw.threads} threads); {how}"
    return (f"device: cuda x{hw.gpus} {hw.gpu_name} ({hw.gpu_memory_gib:g} GiB, capability {hw.capability[0]}."
            f"{hw.capability[1]}, CUDA {hw.cuda_version or '?'}, driver {hw.driver_version or '?'}); {how}")


def device_record(choice: DeviceChoice, hw: Hardware) -> dict[str, str | int | float | bool]:
    """The resolved device and the hardware's facts, flat, as MLflow params of a run."""
    record: dict[str, str | int | float | bool] = {"device": choice.device, "amp": choice.amp,
                                                   "grad_scaler": choice.grad_scaler,
                                                   "channels_last": choice.channels_last,
                                                   "deterministic": choice.deterministic,
                                                   "cores": hw.cores, "threads": hw.threads}
    if choice.device == "cuda":
        record.update(gpus=hw.gpus, gpu_name=hw.gpu_name, gpu_memory_gib=hw.gpu_memory_gib,
                      capability=f"{hw.capability[0]}.{hw.capability[1]}", cuda_version=hw.cuda_version,
                      driver_version=hw.driver_version)
    return record


def resolve_device(name: str) -> "torch.device":
    """`auto` picks CUDA when present; asking for CUDA without one is a user error."""
    import torch

    return torch.device(resolve(name, "off", False, False, probe()).device)


def cluster_hardware(nodes: list[dict[str, Any]]) -> tuple[Hardware, int]:
    """What `auto` shares on a Ray cluster (`nodes` as `ray.nodes()` lists them): the live nodes' CPUs and GPUs
    in all, and the most CPUs one node has (a trial runs on one node)."""
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    cpus = [int(resources.get("CPU", 0)) for resources in alive]
    gpus = sum(int(resources.get("GPU", 0)) for resources in alive)
    return Hardware(cores=sum(cpus), threads=max(cpus, default=1), gpus=gpus), max(cpus, default=1)


def trial_resources(cpus: float | str, gpus: float | str, max_concurrent: int, hw: Hardware) -> tuple[float, float]:
    """(CPUs, GPUs) per search trial; `auto` shares the machine between `max_concurrent` trials: whole cores,
    and a GPU fraction (at most one GPU; 0 without GPUs, so trials run on the CPU)."""
    if cpus == "auto":
        cpus = max(1, hw.cores // max_concurrent)
    if gpus == "auto":
        gpus = 0.0 if hw.gpus == 0 else min(1.0, math.floor(10_000 * hw.gpus / max_concurrent) / 10_000)
    return float(cpus), float(gpus)
