"""Shared test set-up: telemetry off, one torch thread per test process, tiny data fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipelines.runtime  # noqa: E402,F401  (sets telemetry off before anything else imports)
import torch  # noqa: E402

torch.set_num_threads(1)

pytest_plugins = ["tests.fixtures"]
