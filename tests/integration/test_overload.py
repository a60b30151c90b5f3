"""Overload over HTTP: a real server past its peak sheds with 503 + Retry-After, drops nothing, and recovers.

One `python -m services.serve` on 127.0.0.1 (a free port, its own BENTOML_HOME) serves a tiny
classifier (an untrained LeNet-5 on 16 px: weights do not change the load) with a known
`serve.max_latency_ms` and `serve.max_concurrency` from a params file, so shedding shows within a
second. The test measures
the server's own peak (closed loop), then sends requests open-loop (on a schedule, whatever the
answers) below that rate and at four times it. Every overload answer must be 503 with
Retry-After: the batching queue over its latency budget and the concurrency cap say the same.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.fixtures import stop

pytestmark = [pytest.mark.integration, pytest.mark.serial]

ROOT = Path(__file__).resolve().parents[2]
# serve.* here: the default queue budget (400 ms shed 2 of 233 requests at half the peak on a slow 2-core box,
# where a garbage collection or a neighbour process stalls the server that long), which 4x the peak passes
# within a second, and a cap the overload passes but a stall below peak does not.
SERVE = {"max_latency_ms": 1000, "max_concurrency": 256}
BELOW_PEAK = 0.5  # "at or below peak": an open loop at exactly the closed-loop peak never drains its queue
OVERLOAD = 4.0
MAX_CONNECTIONS = 512  # the open-loop client's connections (past the cap); requests past them wait client-side
ANSWER_TIMEOUT_S = 15.0


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_classifier(directory: Path) -> str:
    """An untrained LeNet-5 (16 px grey, 10 classes) saved as the train stage saves models; returns its task."""
    import torch

    from models import _checkpoint as checkpoint
    from models._registry import build, families
    from pipelines.tasks import ClassifyTask

    task = ClassifyTask.name
    family = "lenet5" if "lenet5" in families(task) else families(task)[0]
    torch.manual_seed(0)
    checkpoint.save(build(task, family, 10, 1, 16), {
        "task": task, "family": family, "hparams": {}, "num_classes": 10, "in_channels": 1, "image_size": 16,
        "classes": [str(c) for c in range(10)], "mean": [0.3], "std": [0.3]}, directory / task)
    return task


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("overload")
    task = tiny_classifier(work / "models")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["serve"].update(SERVE)
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    port = free_port()
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "CONVFORGE_PARAMS": str(work / "params.yaml"),
           "CONVFORGE_HOST": "127.0.0.1", "CONVFORGE_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    log_path = work / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "services.serve", "--models-dir", str(work / "models"),
                                    "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while asyncio.run(answer_once(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")).status != 200:
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        yield {"port": port, "request": request_bytes(port, task), "log": log_path}
    finally:
        stop(process)


def request_bytes(port: int, task: str) -> bytes:
    """POST /<task> with one base64 16 px PNG, as a client sends it."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (16, 16), 90).save(buffer, format="PNG")
    body = json.dumps({"images": [base64.b64encode(buffer.getvalue()).decode()]}).encode()
    return (f"POST /{task} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


# ---------------------------------------------------------------- a small HTTP/1.1 client


@dataclass(frozen=True)
class Answer:
    """One request's outcome: its status (0: the connection closed or timed out without an answer)."""

    status: int
    retry_after: str | None = None
    keep_alive: bool = True
    error: str = ""  # the body of an answer other than 200


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> Answer:
    writer.write(request)
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        return Answer(0, keep_alive=False)
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    status = int(status_line.split()[1])
    return Answer(status, headers.get("retry-after"), headers.get("connection", "").lower() != "close",
                  "" if status == 200 else body.decode(errors="replace")[:120])


async def answer_once(port: int, request: bytes) -> Answer:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return Answer(0)
    try:
        return await asyncio.wait_for(exchange(reader, writer, request), ANSWER_TIMEOUT_S)
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        return Answer(0)
    finally:
        writer.close()


async def closed_loop(port: int, request: bytes, clients: int, seconds: float) -> float:
    """200s per second with `clients` connections each keeping one request in flight."""
    done = 0

    async def client() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < stop_at:
                answer = await exchange(reader, writer, request)  # before `done +=`: it reads `done` first
                done += answer.status == 200
        finally:
            writer.close()

    stop_at = time.perf_counter() + seconds
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / seconds


async def open_loop(port: int, request: bytes, rate: float, seconds: float) -> tuple[list[Answer], float]:
    """Requests sent on a fixed schedule of `rate` per second for `seconds`, whatever the answers; returns
    every answer and the rate the schedule reached."""
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    slots = asyncio.Semaphore(MAX_CONNECTIONS)
    answers: list[Answer] = []

    async def one() -> None:
        async with slots:
            try:
                reader, writer = idle.pop() if idle else await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                answers.append(Answer(0))
                return
            try:
                answer = await asyncio.wait_for(exchange(reader, writer, request), ANSWER_TIMEOUT_S)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                answer = Answer(0, keep_alive=False)
            answers.append(answer)
            if answer.keep_alive:
                idle.append((reader, writer))
            else:
                writer.close()

    start, sent, tasks = time.perf_counter(), 0, []
    while (now := time.perf_counter()) < start + seconds:
        due = int((now - start) * rate) + 1
        tasks += [asyncio.create_task(one()) for _ in range(due - sent)]
        sent = due
        await asyncio.sleep(0.005)
    reached = sent / (time.perf_counter() - start)
    await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.close()
    return answers, reached


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def peak(server) -> float:
    asyncio.run(closed_loop(server["port"], server["request"], 8, 1.0))  # warm connections and the dispatcher
    rate = asyncio.run(closed_loop(server["port"], server["request"], 16, 3.0))
    assert rate > 20, f"the server answered only {rate:.0f} req/s"
    return rate


def outcome(answers: list[Answer], reached: float, peak: float) -> str:
    statuses = Counter(answer.status for answer in answers)
    errors = Counter(answer.error for answer in answers if answer.error)
    return f"at {reached:.0f} req/s (peak {peak:.0f}): {dict(statuses)} {dict(errors.most_common(3))}"


def test_below_peak_every_request_is_served(server, peak) -> None:
    answers, reached = asyncio.run(open_loop(server["port"], server["request"], BELOW_PEAK * peak, 3.0))
    assert all(answer.status == 200 for answer in answers), outcome(answers, reached, peak)


def test_overload_sheds_with_503_and_recovers(server, peak) -> None:
    answers, reached = asyncio.run(open_loop(server["port"], server["request"], OVERLOAD * peak, 4.0))
    statuses, seen = Counter(answer.status for answer in answers), outcome(answers, reached, peak)
    assert set(statuses) <= {200, 503}, seen  # no 429, no 504, no 500, no dropped connection (0)
    assert statuses[503] > 0 and statuses[200] > 0, seen
    assert all(answer.retry_after for answer in answers if answer.status == 503), "503 without Retry-After"

    time.sleep(1.0)  # the Retry-After the server asked for
    after, reached = asyncio.run(open_loop(server["port"], server["request"], BELOW_PEAK * peak, 2.0))
    assert all(answer.status == 200 for answer in after), "not recovered: " + outcome(after, reached, peak)
    assert "Traceback" not in server["log"].read_text()
