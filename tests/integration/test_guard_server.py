"""The request guard on a real server (the reviewer's findings): invented paths cannot grow /metrics, /explain
shares the concurrency cap and the outcome counter, `targets` are refused where nothing scores them, options
stay in the body, wrapped base64 decodes, 404/405 are JSON, a cancelled upload is neither parsed nor counted,
and large uploads at once stay within the pixel budget (503 + Retry-After past it), so memory stays bounded.

`python -m services.serve --models-dir` servers of untrained tiny models (classify, reconstruct) on
127.0.0.1, each in its own BENTOML_HOME: one with `serve.max_concurrency: 2`, one with room for many
requests and a pixel budget of two 4096 px uploads.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines.tasks import ClassifyTask, ReconstructTask
from tests.integration.test_metrics_per_server import ROOT, png, save_untrained, scrape, start, stop, wait_ready

pytestmark = pytest.mark.integration

SERVE = {"max_concurrency": 2, "workers": 1}
CONCURRENT_EXPLAINS = 6
LARGE_SIDE = 4096  # serve.max_pixels: 16.8 MP, about 100 MB while it decodes and converts
LARGE_UPLOADS = 24  # at once: 2.4 GB of decoding without a budget
BUDGET_SERVE = {"max_concurrency": 64, "workers": 1, "max_pixels_in_flight": 2 * LARGE_SIDE ** 2}
PEAK_RISE_MB = 800  # what the budget's two decodes, threads and buffers may add to the worker's peak RSS


def serve_with(work, serve: dict, tasks: tuple[str, ...]):
    """A ready server of untrained `tasks` models with params.yaml's `serve` section updated by `serve`."""
    models = save_untrained(work / "models", tasks)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["serve"].update(serve)
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "CONVFORGE_PARAMS": str(work / "params.yaml"),
           "PYTHONUNBUFFERED": "1"}
    running = start(sys.executable, models, work / "server.log", env)
    try:
        wait_ready(running)
        yield running
    finally:
        stop(running)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve_with(tmp_path_factory.mktemp("guard"), SERVE, (ClassifyTask.name, ReconstructTask.name))


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory):
    yield from serve_with(tmp_path_factory.mktemp("budget"), BUDGET_SERVE, (ClassifyTask.name,))


def outcomes(base: str, task: str) -> dict[str, float]:
    """convforge_requests_total of `task` by status class."""
    family = scrape(base).get("convforge_requests")
    counted: dict[str, float] = {}
    for sample in getattr(family, "samples", []):
        if sample.name.endswith("_total") and sample.labels["task"] == task:
            counted[sample.labels["status_class"]] = counted.get(sample.labels["status_class"], 0) + sample.value
    return counted


def noisy_png(side: int) -> bytes:
    """A grey PNG of random pixels (large: each /explain of it takes a while)."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def test_invented_paths_get_json_404s_and_add_no_metrics_series(server):
    with httpx.Client(base_url=server.base, timeout=30) as client:
        for path in ("/nothing-here", "/livez", "/docs.json", "/version"):  # the series they make exist from here on
            client.get(path)
        before = len(client.get("/metrics").text.splitlines())
        for path in [f"/x{uuid.uuid4()}" for _ in range(200)] + ["/CLASSIFY", "/classify/x", "/%E2%98%83"]:
            answer = client.get(path)
            assert answer.status_code == 404 and answer.json()["error"], (path, answer.text)
        after = len(client.get("/metrics").text.splitlines())
        assert after - before < 5, after - before  # was about +20 lines per invented path
        for path in ("/livez", "/readyz", "/docs.json", "/version", "/metrics"):
            assert client.get(path).status_code == 200, path
    endpoints = {s.labels["endpoint"] for s in scrape(server.base)["bentoml_service_request"].samples}
    assert "unmatched" in endpoints and not [e for e in endpoints if e.startswith("/x")], endpoints
    assert len(endpoints) <= 16, endpoints


def test_explain_shares_the_concurrency_cap_and_is_counted(server):
    before = outcomes(server.base, "explain")
    body = noisy_png(1500)

    def explain(_: int) -> httpx.Response:
        return httpx.post(f"{server.base}/explain", files={"images": ("n.png", body, "image/png")}, timeout=120)

    with ThreadPoolExecutor(CONCURRENT_EXPLAINS) as pool:
        answers = list(pool.map(explain, range(CONCURRENT_EXPLAINS)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1 and set(statuses) <= {200, 503}, statuses
    assert all(a.headers["retry-after"] for a in answers if a.status_code == 503)
    served = next(a.json()["results"][0] for a in answers if a.status_code == 200)
    assert served["in_domain"] is False and "larger" in served["reason"], served.get("reason")
    after = outcomes(server.base, "explain")
    assert sum(after.values()) - sum(before.values()) == CONCURRENT_EXPLAINS, (before, after)
    assert after.get("5xx", 0) - before.get("5xx", 0) == statuses.count(503)


def test_targets_are_refused_where_nothing_scores_them(server):
    image, target = png(16, 16), png(16, 16)
    files = [("images", ("i.png", image, "image/png")), ("targets", ("t.png", target, "image/png"))]
    refused = httpx.post(f"{server.base}/classify", files=files, timeout=30)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"].startswith("targets: only /reconstruct takes targets")
    scored = httpx.post(f"{server.base}/reconstruct", files=files, timeout=30)
    assert scored.status_code == 200 and scored.json()["results"][0]["psnr"] is not None, scored.text
    bad = httpx.post(f"{server.base}/reconstruct", timeout=30, files=[
        ("images", ("i.png", image, "image/png")), ("targets", ("t.png", b"not a png", "image/png"))])
    assert bad.status_code == 400 and bad.json()["error"].startswith("targets[0]"), bad.text


def test_options_in_the_query_string_are_400_and_wrapped_base64_decodes(server):
    text = base64.b64encode(png(16, 16)).decode()
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76)) + "\n"
    query = httpx.post(f"{server.base}/classify?top_k=1", json={"image": text}, timeout=30)
    assert query.status_code == 400 and "query string" in query.json()["error"], query.text
    answer = httpx.post(f"{server.base}/classify", json={"image": wrapped, "top_k": 1}, timeout=30)
    assert answer.status_code == 200 and len(answer.json()["results"][0]["labels"]) == 1, answer.text
    wrong = httpx.get(f"{server.base}/classify", timeout=30)
    assert wrong.status_code == 405 and "POST" in wrong.json()["error"], wrong.text


def test_a_cancelled_upload_is_neither_answered_nor_counted(server):
    before = outcomes(server.base, ClassifyTask.name)
    host, port = server.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b'{"images": ["iVBORw0KGgo')  # then the client leaves
    time.sleep(1.0)
    assert outcomes(server.base, ClassifyTask.name) == before  # the old guard parsed the half body: a 4xx
    assert httpx.get(f"{server.base}/livez", timeout=10).status_code == 200


def peak_rss_mb(root_pid: int) -> float:
    """The highest peak RSS (VmHWM) of `root_pid` and its descendants (BentoML's worker), in MB."""
    import subprocess

    table = [line.split() for line in subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True,
                                                     check=True).stdout.splitlines()]
    family, grown = {str(root_pid)}, True
    while grown:
        children = {pid for pid, parent in table if parent in family} - family
        family |= children
        grown = bool(children)
    peaks = []
    for pid in family:
        try:
            status = open(f"/proc/{pid}/status").read()
        except OSError:  # gone meanwhile
            continue
        peaks += [int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
    return max(peaks)


def test_large_uploads_at_once_stay_within_the_pixel_budget(budget_server):
    """24 uploads of 4096 x 4096 PNGs (0.4 MB each, 100 MB apiece decoding) at once: those past the budget of two
    get 503 + Retry-After instead of all decoding together (which took the worker 2 GB higher), and the budget
    comes back for the next client."""
    y, x = np.mgrid[0:LARGE_SIDE, 0:LARGE_SIDE] * 256 // LARGE_SIDE
    buffer = io.BytesIO()
    Image.fromarray(np.stack([x, y, (x + y) // 2], -1).astype(np.uint8)).save(buffer, format="PNG")
    body = buffer.getvalue()
    before = peak_rss_mb(budget_server.process.pid)

    def classify(_: int) -> httpx.Response:
        return httpx.post(f"{budget_server.base}/classify", files={"images": ("g.png", body, "image/png")},
                          timeout=120)

    with ThreadPoolExecutor(LARGE_UPLOADS) as pool:
        answers = list(pool.map(classify, range(LARGE_UPLOADS)))
    rise = peak_rss_mb(budget_server.process.pid) - before
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) == {200, 503}, statuses
    refused = [a for a in answers if a.status_code == 503]
    assert all(a.headers["retry-after"] == "1" and "decoded pixels in flight" in a.json()["error"] for a in refused)
    assert rise < PEAK_RISE_MB, f"the worker's peak RSS rose {rise:.0f} MB"
    time.sleep(1)
    assert classify(0).status_code == 200  # the budget came back
