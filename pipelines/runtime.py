"""Process set-up every stage shares: no telemetry, seeds, threads, device, atomic writes."""

from __future__ import annotations

import os
import random

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


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; in deterministic mode also pick deterministic kernels."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # CUDA needs this for deterministic cuBLAS; bilinear upsampling's backward has no
        # deterministic CUDA kernel, so segmentation decoders warn instead of failing.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def set_threads(num_threads: int) -> int:
    """Use `num_threads` intra-op threads (0 = every core this process may use); returns the count."""
    import torch

    count = num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(count)
    return count


def resolve_device(name: str) -> "torch.device":
    """`auto` picks CUDA when present; asking for CUDA without one is a user error."""
    import torch

    from pipelines.errors import ConvForgeError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConvForgeError("train.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)
