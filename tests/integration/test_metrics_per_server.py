"""Two servers from one checkout and one BENTOML_HOME each keep their own /metrics.

BentoML keeps Prometheus' multiprocess files at `<BENTOML_HOME>/prometheus_multiproc_dir` and
empties that folder whenever a server starts; services.serve gives every server a BENTOML_HOME of
its own, so a second server, or its restart, neither wipes nor mixes into the first one's series.
Both servers here serve the same untrained tiny classifier through `python -m services.serve`.
"""

from __future__ import annotations

import io
import math
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pipelines import scratch
from pipelines.tasks import ClassifyTask
from services.serve import INSTANCE_PREFIX
from tests.fixtures import stop as stop_process, wait_ready as until_ready

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TINY = {"lenet5": {}, "fcos": {}, "unet": {"depth": 2, "width": 8}}  # a small family per task


def save_untrained(root: Path, tasks: tuple[str, ...], size: int = 16) -> Path:
    """`root/<task>/` as the train stage writes it (safetensors + config.json), untrained weights:
    a served model's speed and metrics do not depend on them."""
    import torch

    from models import _checkpoint as checkpoint
    from models._registry import build, families

    torch.manual_seed(0)
    classes = [str(digit) for digit in range(10)]
    for task in tasks:
        family = next(name for name in TINY if name in families(task))
        model = build(task, family, len(classes), 1, size, **TINY[family])
        checkpoint.save(model, {"task": task, "family": family, "hparams": TINY[family], "num_classes": len(classes),
                                "in_channels": 1, "image_size": size, "classes": classes, "mean": [0.5],
                                "std": [0.25]}, root / task)
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A `python -m services.serve` process in its own process group, and where it answers."""

    process: subprocess.Popen
    base: str
    log: Path

    def home(self) -> Path:
        """The BENTOML_HOME services.serve gave this server (from its first log line)."""
        found = re.search(r"\(BENTOML_HOME (\S+)\)", self.log.read_text())
        assert found, self.log.read_text()[-2000:]
        return Path(found.group(1))


def start(python: str, models: Path, log: Path, env: dict[str, str], cwd: Path = ROOT) -> Server:
    """Start `python -m services.serve --models-dir models` on a free port of 127.0.0.1."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([python, "-m", "services.serve", "--models-dir", str(models), "--host", "127.0.0.1",
                                    "--port", str(port)], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return Server(process, f"http://127.0.0.1:{port}", log)


def wait_ready(server: Server, timeout: float = 150) -> None:
    until_ready(server.base, server.process, server.log, timeout)


def stop(server: Server) -> None:
    stop_process(server.process)


def scrape(base: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {family.name: family for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)}


def png(width: int, height: int, mode: str = "L") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (width, height), 90).save(buffer, format="PNG")
    return buffer.getvalue()


def classify(server: Server, times: int) -> None:
    for _ in range(times):
        reply = httpx.post(f"{server.base}/{ClassifyTask.name}",
                           files={"images": ("grey.png", png(16, 16), "image/png")}, timeout=30)
        assert reply.status_code == 200, reply.text


def assert_own_counts(server: Server, requests: int) -> None:
    """/metrics counts exactly `requests` classify calls (ours and BentoML's series), all of them answered
    200, spells the model version one way, and every histogram value is a finite number."""
    families = scrape(server.base)
    task, route = ClassifyTask.name, f"/{ClassifyTask.name}"

    def samples(name: str, suffix: str) -> list:  # a series with no sample yet is not listed at all
        return [s for s in getattr(families.get(name), "samples", []) if s.name.endswith(suffix)]

    ours = {(s.labels["task"], s.labels["status_class"]): s.value for s in samples("convforge_requests", "_total")}
    assert ours == ({(task, "2xx"): requests} if requests else {}), (server.base, ours)
    # BentoML's own counter (it writes zeros for the 200 and 500 series of each api up front)
    codes = {s.labels["http_response_code"]: s.value for s in samples("bentoml_service_request", "_total")
             if s.labels["endpoint"] == route and s.value}
    assert codes == ({"200": requests} if requests else {}), (server.base, codes)
    counted = [s.value for s in samples("convforge_preprocess_seconds", "_count")]
    assert sum(counted) == requests, (server.base, counted)
    served = httpx.get(f"{server.base}/version").json()["models"][task]["version"]
    spelled = {s.labels["model_version"] for name, family in families.items() if name.startswith("convforge_")
               for s in family.samples if "model_version" in s.labels}
    assert spelled == {served}, spelled  # the bare version in every series, the request counter included
    for family in families.values():
        if family.type == "histogram":
            bad = [s for s in family.samples if not math.isfinite(s.value)]
            assert not bad, (server.base, family.name, bad[:3])


def test_each_server_keeps_its_own_metrics(tmp_path):
    models = save_untrained(tmp_path / "models", (ClassifyTask.name,))
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "PYTHONUNBUFFERED": "1"}
    first = start(sys.executable, models, tmp_path / "first.log", env)
    second = start(sys.executable, models, tmp_path / "second.log", env)
    servers = [first, second]
    try:
        wait_ready(first)
        wait_ready(second)
        assert second.home() != first.home()
        classify(first, 3)
        classify(second, 5)
        assert_own_counts(first, 3)  # not 8: the two servers' series do not mix
        assert_own_counts(second, 5)

        stop(second)
        restarted = start(sys.executable, models, tmp_path / "restarted.log", env)
        servers.append(restarted)
        wait_ready(restarted)
        assert not second.home().exists() and first.home().is_dir()  # a stopped server's folder goes at the next start
        assert_own_counts(first, 3)  # a server starting beside it left its series alone
        assert_own_counts(restarted, 0)
        classify(restarted, 2)
        classify(first, 1)
        assert_own_counts(first, 4)
        assert_own_counts(restarted, 2)
    finally:
        for server in servers:
            stop(server)
        scratch.sweep(INSTANCE_PREFIX)  # their homes, which the next server to start would remove

