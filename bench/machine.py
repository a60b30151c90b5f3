"""The machine and moment a bench script ran on, as its result JSON records them; its flags' parser and checks."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, as the result JSONs record them (at start and at end)."""
    return [round(x, 2) for x in os.getloadavg()]


def describe() -> dict:
    """CPU model and count, load average, torch version and the local date and time."""
    import torch

    from pipelines.runtime import cpu_info

    model = cpu_info("model name") or platform.processor() or platform.machine()
    return {"cpus": len(os.sched_getaffinity(0)), "cpu": model, "torch": torch.__version__,
            "load_avg_at_start": load_average(), "time": time.strftime("%Y-%m-%dT%H:%M")}


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line on stderr (exit 2), without the usage block."""

    def error(self, message: str) -> None:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _whole(text: str, least: int) -> int:
    """`text` as a whole number >= `least`, or argparse's one clear line (as its `type`)."""
    if not text.isdigit() or int(text) < least:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}")
    return int(text)


def positive(text: str) -> int:
    """A count flag: a whole number >= 1."""
    return _whole(text, 1)


def whole(text: str) -> int:
    """A flag counted from 0 (stages frozen, an epoch where 0 means never)."""
    return _whole(text, 0)


def _real(text: str, ok, expected: str) -> float:
    """`text` as a number for which `ok` holds, or argparse's one clear line (NaN and words fail too)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A share of the items: a number above 0 and at most 1."""
    return _real(text, lambda value: 0 < value <= 1, "a fraction above 0 and at most 1")


def seconds(text: str) -> float:
    """A duration: a number of seconds above 0."""
    return _real(text, lambda value: 0 < value < float("inf"), "seconds above 0")


def thread_count(text: str) -> int:
    """A `--threads` flag: a whole number >= 0 (0: every core, as pipelines.runtime.set_threads reads it)."""
    return _whole(text, 0)


def result_file(text: str) -> Path:
    """An `--out` flag: the JSON file a bench writes, checked before any work (written at the end, a folder or a
    path below a file would fail only then, after the measuring)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give the JSON file to write")
    folder = next(parent for parent in path.absolute().parents if parent.exists())  # the nearest that exists
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{folder} is a file, so {text} cannot be written")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{folder} is not writable, so {text} cannot be written")
    return path
