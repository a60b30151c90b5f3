"""Serving benchmark: throughput and p50/p99 latency at 1/8/32/64 concurrent clients, one run.

Configurations, each a real server on 127.0.0.1 (all started first, then every level measured
config after config, so the box's other load hits them alike), measured by the same closed-loop
client (N keep-alive connections, one request in flight each, for `--duration` seconds a level):
  bento-torch-batched    the ConvForge service, PyTorch, adaptive batching (serve.max_batch_size)
  bento-torch-unbatched  the same with max_batch_size 1 (one image per forward)
  bento-onnx-batched     ONNX Runtime backend (the tasks pipelines/export.py exports), batching on
  fastapi-bare           the same classify model in a plain FastAPI handler under uvicorn
Requests are JSON with one base64 PNG (28 px grey for classify, a 64 px scene for detect and
segment). Models: artifacts/models/<task> when trained, else fresh registry models of the
default sizes (ResNet on 28 px, FCOS and U-Net on 64 px; weights do not change the speed).

    .venv/bin/python bench/serve.py              # a few minutes
Writes bench/results/serve.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)
from pipelines.export import EXPORTABLE  # noqa: E402
from pipelines.tasks import TASKS as ADAPTERS  # noqa: E402
from starlette.requests import Request  # noqa: E402  (FastAPI resolves the baseline handler's annotation here)

LEVELS = (1, 8, 32, 64)
TASKS = tuple(ADAPTERS)


# ---------------------------------------------------------------- models and payloads


def bench_models(work: Path) -> tuple[Path, dict[str, str]]:
    """artifacts/models/<task> where trained, else fresh default-size registry models saved to `work`."""
    import torch

    from models import _checkpoint as checkpoint
    from models._registry import build, families

    where, source = work / "models", {}
    fresh = {"classify": ("resnet", 28, 10), "detect": ("fcos", 64, 10), "segment": ("unet", 64, 10)}
    for task in TASKS:
        trained = ROOT / "artifacts" / "models" / task
        target = where / task
        if (trained / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(trained, target_is_directory=True)
            source[task] = f"artifacts/models/{task} ({json.loads((trained / 'config.json').read_text())['family']})"
            continue
        family, size, classes = fresh[task]
        if family not in families(task):
            family = families(task)[0]
        torch.manual_seed(0)
        model = build(task, family, classes, 1, size)
        checkpoint.save(model, {"task": task, "family": family, "hparams": {}, "num_classes": classes,
                                "in_channels": 1, "image_size": size, "classes": [str(c) for c in range(classes)],
                                "mean": [0.29], "std": [0.35]}, target)
        source[task] = f"fresh {family} {size}px"
    return where, source


def png_payload(task: str, size: int) -> bytes:
    """A JSON request body with one PNG: bright shapes on black, like the training data."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    array = np.zeros((size, size), np.uint8)
    for _ in range(1 if task == "classify" else 3):
        y, x = rng.integers(0, size - size // 3, 2)
        array[y:y + size // 3, x:x + size // 3] = rng.integers(120, 255)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    body = {"images": [base64.b64encode(buffer.getvalue()).decode()]}
    if task == "detect":
        body["score_threshold"] = 0.3
    return json.dumps(body).encode()


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_params(work: Path, name: str, **serve: object) -> Path:
    """params.yaml with `serve` overrides, for one server."""
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["serve"].update(serve)
    path = work / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def wait_ready(port: int, process: subprocess.Popen, timeout: float = 240) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server never became ready")


def start(kind: str, models: Path, params: Path | None, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "CONVFORGE_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    if kind == "bento":
        env.update(CONVFORGE_MODELS_DIR=str(models), CONVFORGE_PARAMS=str(params))
        cmd = [sys.executable, "-m", "services.serve", "--models-dir", str(models), "--port", str(port)]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline", str(models / "classify"),
               "--port", str(port)]
    out = open(log, "w")
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    wait_ready(port, process)
    return process


def stop(process: subprocess.Popen) -> None:
    """End the server we started (its own process group: bentoml serve has worker children)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


# ---------------------------------------------------------------- the bare baseline


def baseline_app(model_dir: Path, num_threads: int):
    """The classify model in a plain FastAPI handler: decode, normalize, forward, softmax, top 5."""
    import numpy as np
    import torch
    from fastapi import FastAPI
    from PIL import Image

    from models import _checkpoint as checkpoint

    runtime.set_threads(num_threads)  # the same intra-op threads as the service (serve.num_threads)
    model, config = checkpoint.load(model_dir)
    mean, std = torch.tensor(config["mean"]).view(1, -1, 1, 1), torch.tensor(config["std"]).view(1, -1, 1, 1)
    size, mode = int(config["image_size"]), "L" if config["in_channels"] == 1 else "RGB"
    app = FastAPI()

    @app.get("/readyz")
    async def readyz() -> dict:
        return {}

    @app.post("/classify")
    async def classify(request: Request) -> dict:  # noqa: F821 - Request is imported at module level for FastAPI
        body = await request.json()
        results = []
        for text in body["images"]:
            image = Image.open(io.BytesIO(base64.b64decode(text))).convert(mode).resize((size, size))
            array = np.asarray(image, dtype=np.float32).reshape(size, size, -1).transpose(2, 0, 1)[None] / 255.0
            with torch.inference_mode():
                probs = torch.softmax(model((torch.from_numpy(array) - mean) / std), 1)[0]
            top = torch.topk(probs, 5)
            results.append([{"class_index": int(i), "label": config["classes"][int(i)], "score": float(p)}
                            for p, i in zip(top.values, top.indices)])
        return {"results": results}

    return app


# ---------------------------------------------------------------- the load generator


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed")
    status = int(status_line.split()[1])
    length, close, chunked = 0, False, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value == "close":
            close = True
        elif name == "transfer-encoding" and "chunked" in value:
            chunked = True
    if chunked:
        while (size := int((await reader.readline()).strip(), 16)) > 0:
            await reader.readexactly(size + 2)
        await reader.readline()
    else:
        await reader.readexactly(length)
    return status, close


async def _client(port: int, request: bytes, stop_at: float, latencies: list, statuses: list) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            began = time.perf_counter()
            try:
                writer.write(request)
                await writer.drain()
                status, close = await _read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                statuses.append(0)
                close = True
            else:
                latencies.append(time.perf_counter() - began)
                statuses.append(status)
            if close:
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    finally:
        writer.close()


def measure(port: int, path: str, body: bytes, clients: int, duration: float) -> dict:
    """Closed loop: `clients` connections, one request in flight each, for `duration` seconds."""
    import numpy as np

    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    latencies: list[float] = []
    statuses: list[int] = []

    async def run() -> float:
        stop_at = time.perf_counter() + duration
        began = time.perf_counter()
        await asyncio.gather(*(_client(port, request, stop_at, latencies, statuses) for _ in range(clients)))
        return time.perf_counter() - began

    elapsed = asyncio.run(run())
    ok = [lat for lat, status in zip(latencies, statuses) if status == 200]
    errors: dict[str, int] = {}
    for status in statuses:
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
    return {"clients": clients, "requests": len(statuses), "ok": len(ok), "errors": errors,
            "throughput_rps": len(ok) / elapsed,
            "p50_ms": float(np.percentile(ok, 50) * 1000) if ok else None,
            "p99_ms": float(np.percentile(ok, 99) * 1000) if ok else None}


# ---------------------------------------------------------------- the run


def verdict(rows: list[dict]) -> dict:
    """The issue's targets, computed from the classify rows."""
    def row(config: str, clients: int) -> dict | None:
        return next((r for r in rows if r["config"] == config and r["task"] == "classify"
                     and r["clients"] == clients), None)

    out: dict = {}
    batched, unbatched = row("bento-torch-batched", 32), row("bento-torch-unbatched", 32)
    if batched and unbatched:
        out["batching_gain_at_32"] = batched["throughput_rps"] / max(unbatched["throughput_rps"], 1e-9)
        out["batching_gain_ok"] = out["batching_gain_at_32"] >= 1.5
    levels = [r for r in rows if r["config"] == "bento-torch-batched" and r["task"] == "classify"
              and r["clients"] >= 8]
    if levels:
        peak = max(r["throughput_rps"] for r in rows if r["config"] == "bento-torch-batched"
                   and r["task"] == "classify")
        out["min_over_peak_8_to_64"] = min(r["throughput_rps"] for r in levels) / max(peak, 1e-9)
        out["errors_8_to_64"] = sum(sum(r["errors"].values()) for r in levels)
        out["max_p99_ms_8_to_64"] = max(r["p99_ms"] or 0 for r in levels)
        out["stable_ok"] = (out["min_over_peak_8_to_64"] >= 0.8 and out["errors_8_to_64"] == 0
                            and out["max_p99_ms_8_to_64"] <= 1000)
    one, bare = row("bento-torch-batched", 1), row("fastapi-bare", 1)
    if one and bare:
        out["vs_bare_at_1"] = one["throughput_rps"] / max(bare["throughput_rps"], 1e-9)
        out["vs_bare_ok"] = out["vs_bare_at_1"] >= 1.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per client level")
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    parser.add_argument("--configs", nargs="+", help="run only these configurations (names as in the table)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help="endpoints to measure")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="serve.* overrides for every bento configuration, e.g. workers=2")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    parser.add_argument("--baseline", help=argparse.SUPPRESS)  # internal: serve the bare baseline
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        import uvicorn

        import yaml

        threads = yaml.safe_load((ROOT / "params.yaml").read_text())["serve"]["num_threads"]
        uvicorn.run(baseline_app(Path(args.baseline), threads), host="127.0.0.1", port=args.port,
                    log_level="warning")
        return

    import yaml

    serve = yaml.safe_load((ROOT / "params.yaml").read_text())["serve"]
    work = Path(tempfile.mkdtemp(prefix="convforge-bench-serve-"))
    models, sources = bench_models(work)
    sizes = {task: json.loads((models / task / "config.json").read_text())["image_size"] for task in TASKS}
    bodies = {task: png_payload(task, 28 if task == "classify" else int(sizes[task])) for task in TASKS}
    configs = [
        ("bento-torch-batched", "bento", {"backend": "torch"}, TASKS),
        ("bento-torch-unbatched", "bento", {"backend": "torch", "max_batch_size": 1}, TASKS),
        ("bento-onnx-batched", "bento", {"backend": "onnx"}, EXPORTABLE),
        ("fastapi-bare", "bare", {}, ("classify",)),
    ]
    common = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    chosen = [c for c in configs if not args.configs or c[0] in args.configs]
    rows: list[dict] = []
    started = time.monotonic()
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        # Every server up at once, then each level measured config after config: the box's other
        # load drifts, and interleaving keeps the comparison within one short window.
        for name, kind, overrides, _ in chosen:
            port = free_port()
            params = write_params(work, name, **{**common, **overrides}) if kind == "bento" else None
            print(f"[{time.monotonic() - started:5.0f}s] starting {name}", flush=True)
            servers[name] = (start(kind, models, params, port, work / f"{name}.log"), port)
        for task in [t for t in TASKS if t in args.tasks]:
            levels = args.levels if task == "classify" else [lvl for lvl in args.levels if lvl in (1, 32)]
            for name, _, _, tasks in chosen:
                if task in tasks:
                    measure(servers[name][1], f"/{task}", bodies[task], 8, 1.0)  # warm connections and caches
            for clients in levels:
                for name, _, _, tasks in chosen:
                    if task not in tasks:
                        continue
                    result = {"config": name, "task": task,
                              **measure(servers[name][1], f"/{task}", bodies[task], clients, args.duration)}
                    rows.append(result)
                    print(f"  {name:22s} {task:8s} {clients:3d} clients  {result['throughput_rps']:7.1f} req/s  "
                          f"p50 {result['p50_ms'] or 0:7.1f} ms  p99 {result['p99_ms'] or 0:7.1f} ms  "
                          f"errors {result['errors'] or 0}", flush=True)
    finally:
        for process, _ in servers.values():
            stop(process)
    rows.sort(key=lambda r: ([c[0] for c in configs].index(r["config"]), TASKS.index(r["task"]), r["clients"]))

    print("\n| config | task | clients | req/s | p50 ms | p99 ms | errors |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['config']} | {r['task']} | {r['clients']} | {r['throughput_rps']:.1f} | "
              f"{r['p50_ms'] or 0:.1f} | {r['p99_ms'] or 0:.1f} | {r['errors'] or 0} |")
    targets = verdict(rows)
    print("\ntargets:", json.dumps(targets, indent=1))
    result = {"rows": rows, "targets": targets, "models": sources, "duration_s": args.duration,
              "serve": {**{k: serve[k] for k in ("max_batch_size", "max_latency_ms", "max_concurrency", "timeout_s",
                                                 "num_threads", "workers")}, **common},
              "cpus": len(os.sched_getaffinity(0)), "load_avg_at_end": os.getloadavg(),
              "wall_s": time.monotonic() - started}
    runtime.write_json(Path(args.out), result)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
