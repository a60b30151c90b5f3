"""The machine and moment a bench script ran on, as its result JSON records them."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def describe() -> dict:
    """CPU model and count, load average, torch version and the local date and time."""
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor() or platform.machine())
    return {"cpus": len(os.sched_getaffinity(0)), "cpu": model, "torch": torch.__version__,
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()], "time": time.strftime("%Y-%m-%dT%H:%M")}
