"""Serving benchmark: the ConvForge service against bare handlers doing the same work, one run.

Configurations, each a real server on 127.0.0.1 with its own BENTOML_HOME (all started first, then
every level measured config after config in short alternating rounds, so the box's other load hits
them alike), measured by one closed-loop client (N keep-alive connections, one request in flight
each, `--duration` seconds a level):
  bento-torch            the ConvForge service, PyTorch, adaptive batching (serve.max_batch_size)
  bento-onnx             the same with serve.backend onnx (the tasks pipelines/export.py exports)
  bento-torch-unbatched  the same as bento-torch with max_batch_size 1 (one image per forward)
  bento-depends          BentoML's own shape: a model service with `@bentoml.api(batchable=True)` behind
                         a front service calling it through `bentoml.depends` (bench/depends_service.py)
  fastapi-bare-torch     a plain FastAPI handler under uvicorn: the same decode (services.imaging) and
  fastapi-bare-onnx      forward (the served runner's backend) on the same model, top-k labels back
Requests are JSON with one base64 PNG (28 px grey for classify, a 64 px scene for detect and
segment), classify at every level, detect and segment on bento-torch and bento-onnx at 1, 8, 32.
Models: artifacts/models/<task> when trained, else fresh registry models of the default sizes
(ResNet on 28 px, FCOS and U-Net on 64 px; weights do not change the speed); each exported to ONNX.

    .venv/bin/python bench/serve.py              # ~5 min on 2 cores
Writes bench/results/serve.json (rows, ratios against the targets, `targets_met`, and `backends`:
req/s at 1 client and at peak per task and backend) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)
from bench.machine import Parser, describe, load_average, positive, result_file, seconds  # noqa: E402
from pipelines.errors import end_on_sigterm, stage_entry  # noqa: E402
from pipelines.tasks import TASKS, ClassifyTask  # noqa: E402
from starlette.requests import Request  # noqa: E402  (FastAPI resolves the bare handler's annotation here)

CLASSIFY = ClassifyTask.name
LEVELS = (1, 8, 32, 64, 128)
SCENE_LEVELS = (1, 8, 32)  # detect and segment: enough for req/s at 1 client and the peak
TARGETS = {"vs_bare_at_1": 0.8, "over_peak_at_64_128": 0.9, "p99_ms_at_64": 1000.0, "onnx_vs_bare_at_1": 0.9}


@dataclass(frozen=True)
class Config:
    """One server to measure: `kind` bento (services.serve), depends or bare; `serve` overrides params.yaml."""

    name: str
    kind: str
    serve: dict = field(default_factory=dict)
    tasks: tuple[str, ...] = (CLASSIFY,)


CONFIGS = (
    Config("bento-torch", "bento", {"backend": "torch"}, tuple(TASKS)),
    Config("bento-onnx", "bento", {"backend": "onnx"}, tuple(TASKS)),
    Config("bento-torch-unbatched", "bento", {"backend": "torch", "max_batch_size": 1}),
    Config("bento-depends", "depends", {"backend": "torch"}),
    Config("fastapi-bare-torch", "bare", {"backend": "torch"}),
    Config("fastapi-bare-onnx", "bare", {"backend": "onnx"}),
)


# ---------------------------------------------------------------- models and payloads


def bench_models(work: Path) -> tuple[Path, dict[str, str]]:
    """artifacts/models/<task> where trained, else fresh default-size registry models, in `work`, with
    model.onnx beside each exportable one (the ONNX backend needs it; a failed export serves torch)."""
    import torch

    from models import _checkpoint as checkpoint
    from models._registry import build, families
    from pipelines.export import EXPORTABLE, export_checked

    where, source = work / "models", {}
    fresh = {"resnet": 28, "fcos": 64, "unet": 64}
    for task in TASKS:
        trained, target = ROOT / "artifacts" / "models" / task, where / task
        target.mkdir(parents=True)
        if (trained / "config.json").is_file():
            for name in ("model.safetensors", "config.json", "registration.json"):
                if (trained / name).is_file():
                    (target / name).symlink_to(trained / name)
            source[task] = f"artifacts/models/{task} ({json.loads((trained / 'config.json').read_text())['family']})"
        else:
            family = next((f for f in fresh if f in families(task)), families(task)[0])
            size = fresh.get(family, 64)
            torch.manual_seed(0)
            model = build(task, family, 10, 1, size)
            checkpoint.save(model, {"task": task, "family": family, "hparams": {}, "num_classes": 10,
                                    "in_channels": 1, "image_size": size, "classes": [str(c) for c in range(10)],
                                    "mean": [0.29], "std": [0.35]}, target)
            source[task] = f"fresh {family} {size}px"
        if task in EXPORTABLE:
            module, config = checkpoint.load(target)
            try:
                export_checked(module, config, target / "model.onnx")
            except Exception as exc:  # noqa: BLE001 - the row then says it served torch
                source[task] += f"; ONNX export failed: {exc}"
    return where, source


def png_payload(task: str, size: int) -> bytes:
    """A JSON request body with one PNG: bright shapes on black, like the training data."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    array = np.zeros((size, size), np.uint8)
    for _ in range(1 if task == CLASSIFY else 3):
        y, x = rng.integers(0, size - size // 3, 2)
        array[y:y + size // 3, x:x + size // 3] = rng.integers(120, 255)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return json.dumps({"images": [base64.b64encode(buffer.getvalue()).decode()]}).encode()


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_params(work: Path, name: str, serve: dict) -> Path:
    """params.yaml with `serve` overrides, for one server."""
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["serve"].update(serve)
    path = work / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def launch(config: Config, models: Path, params: Path, port: int, work: Path) -> subprocess.Popen:
    """Start one server (its own process group and BENTOML_HOME); `wait_ready` before using it. The servers are out
    of reach of a signal to this process: from here on its SIGTERM raises as Ctrl-C does (`end_on_sigterm`), so the
    caller's `finally` stops them (the scripts run under `stage_entry`: one line, exit 143)."""
    end_on_sigterm()
    home = work / f"home-{config.name}"
    env = {**os.environ, "CONVFORGE_PORT": str(port), "CONVFORGE_HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1",
           "CONVFORGE_MODELS_DIR": str(models), "CONVFORGE_PARAMS": str(params), "BENTOML_HOME": str(home)}
    if config.kind == "bento":
        cmd = [sys.executable, "-m", "services.serve", "--models-dir", str(models), "--port", str(port)]
    elif config.kind == "depends":
        cmd = [sys.executable, "-m", "bentoml", "serve", "bench.depends_service:Front", "--host", "127.0.0.1",
               "--port", str(port)]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--bare", str(models), "--port", str(port)]
    log = open(work / f"{config.name}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(port: int, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server never became ready:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """End a server we started (its own process group: bentoml serve has worker children)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


# ---------------------------------------------------------------- the bare handlers


def bare_app(models: Path):
    """The classify model in a plain FastAPI handler: the service's decode (services.imaging.prepare, its
    limits and fit) and the served runner's forward, inline, then the top-k labels; nothing else."""
    import numpy as np
    from fastapi import FastAPI

    from pipelines.params import load_params
    from services.imaging import DecodeLimits, prepare
    from services.runners import load_runner

    serve = load_params(os.environ["CONVFORGE_PARAMS"]).serve
    threads = runtime.set_threads(serve.num_threads)
    runner = load_runner(CLASSIFY, models / CLASSIFY, name=CLASSIFY, version="bare", backend=serve.backend,
                         max_batch_size=1, max_latency_ms=serve.max_latency_ms, num_threads=threads)
    limits = DecodeLimits(serve.max_pixels, tuple(serve.formats))
    app = FastAPI()

    @app.get("/readyz")
    async def readyz() -> dict:
        return {}

    @app.post(f"/{CLASSIFY}")
    async def classify(request: Request) -> dict:  # noqa: F821 - Request is imported at module level for FastAPI
        body = await request.json()
        items = [prepare(base64.b64decode(text), limits, runner.fit, runner.in_channels) for text in body["images"]]
        probs = runner.run(np.stack([item.array for item in items]))
        return {"results": [[{"class_index": int(i), "label": runner.classes[int(i)], "score": float(row[i])}
                             for i in np.argsort(-row)[:serve.top_k]] for row in probs]}

    runner.run(np.zeros((1, runner.image_size, runner.image_size, runner.in_channels), np.uint8))
    return app, runner.card.backend


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
                statuses.append(0)  # a dropped connection
                close = True
            else:
                latencies.append((time.perf_counter() - began, status))
                statuses.append(status)
            if close:
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    finally:
        writer.close()


@dataclass
class Sample:
    """What one config answered at one level: (seconds, status) per answered request, drops as status 0."""

    latencies: list = field(default_factory=list)
    statuses: list = field(default_factory=list)
    elapsed: float = 0.0

    def summary(self) -> dict:
        import numpy as np

        ok = [lat for lat, status in self.latencies if status == 200]
        errors: dict[str, int] = {}
        for status in self.statuses:
            if status != 200:
                errors[str(status)] = errors.get(str(status), 0) + 1
        return {"rps": round(len(ok) / max(self.elapsed, 1e-9), 1),
                "p50_ms": round(float(np.percentile(ok, 50)) * 1000, 2) if ok else None,
                "p99_ms": round(float(np.percentile(ok, 99)) * 1000, 2) if ok else None,
                "requests": len(self.statuses), "errors": errors}


def measure(port: int, path: str, body: bytes, clients: int, duration: float, into: Sample) -> Sample:
    """Closed loop: `clients` connections, one request in flight each, for `duration` seconds."""
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def run() -> float:
        stop_at = time.perf_counter() + duration
        began = time.perf_counter()
        await asyncio.gather(*(_client(port, request, stop_at, into.latencies, into.statuses)
                               for _ in range(clients)))
        return time.perf_counter() - began

    into.elapsed += asyncio.run(run())
    return into


# ---------------------------------------------------------------- ratios against the targets


def _rps(rows: list[dict], config: str, task: str, clients: int | None = None) -> float | None:
    """req/s of `config` on `task` at `clients` (None: its peak over the levels measured)."""
    found = [r["rps"] for r in rows if r["config"] == config and r["task"] == task
             and (clients is None or r["clients"] == clients)]
    return max(found) if found else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def verdict(rows: list[dict]) -> dict:
    """Each comparison: its ratio (or figure), its target, whether it is met."""
    torch_rows = [r for r in rows if r["config"] == "bento-torch" and r["task"] == CLASSIFY and r["clients"] >= 64]
    peak = _rps(rows, "bento-torch", CLASSIFY)
    out = {
        "vs_bare_at_1": {"compares": "bento-torch / fastapi-bare-torch, classify, 1 client",
                         "value": _ratio(_rps(rows, "bento-torch", CLASSIFY, 1),
                                         _rps(rows, "fastapi-bare-torch", CLASSIFY, 1)), "target": ">= 0.8"},
        "over_peak_at_64_128": {"compares": "bento-torch req/s at 64 and 128 clients / its peak (the lower)",
                                "value": _ratio(min((r["rps"] for r in torch_rows), default=None), peak),
                                "target": ">= 0.9"},
        "errors_not_503_at_64_128": {"compares": "bento-torch answers other than 200 and 503 at 64 and 128",
                                     "value": sum(n for r in torch_rows for s, n in r["errors"].items()
                                                  if s != "503"), "target": "== 0"},
        "p99_ms_at_64": {"compares": "bento-torch classify p99 at 64 clients",
                         "value": next((r["p99_ms"] for r in torch_rows if r["clients"] == 64), None),
                         "target": "<= 1000"},
        "onnx_vs_bare_at_1": {"compares": "bento-onnx / fastapi-bare-onnx, classify, 1 client",
                              "value": _ratio(_rps(rows, "bento-onnx", CLASSIFY, 1),
                                              _rps(rows, "fastapi-bare-onnx", CLASSIFY, 1)), "target": ">= 0.9"},
    }
    for item in out.values():
        value, (op, bound) = item["value"], item["target"].split()
        item["met"] = value is not None and {">=": value >= float(bound), "<=": value <= float(bound),
                                             "==": value == float(bound)}[op]
    return out


def comparisons(rows: list[dict]) -> dict:
    """Figures without a target: what batching, ONNX and the depends shape buy (req/s ratios)."""
    def at(config: str, clients: int | None) -> float | None:
        return _rps(rows, config, CLASSIFY, clients)

    return {
        "batched_vs_unbatched_at_32": _ratio(at("bento-torch", 32), at("bento-torch-unbatched", 32)),
        "onnx_vs_bare_at_peak": _ratio(at("bento-onnx", None), at("fastapi-bare-onnx", None)),
        "torch_vs_bare_at_peak": _ratio(at("bento-torch", None), at("fastapi-bare-torch", None)),
        "depends_vs_in_process_at_1": _ratio(at("bento-depends", 1), at("bento-torch", 1)),
        "depends_vs_in_process_at_peak": _ratio(at("bento-depends", None), at("bento-torch", None)),
    }


def backends(rows: list[dict], served: dict[str, dict[str, str]]) -> dict:
    """Per task, req/s at 1 client and at peak for each backend the bento configs really served."""
    out: dict = {}
    for config, backend in (("bento-torch", "torch"), ("bento-onnx", "onnx")):
        for task in TASKS:
            if _rps(rows, config, task) is not None and served.get(config, {}).get(task) == backend:
                out.setdefault(task, {})[backend] = {"rps_1": _rps(rows, config, task, 1),
                                                     "rps_peak": _rps(rows, config, task)}
    return out


# ---------------------------------------------------------------- the run


def machine() -> dict:
    import bentoml
    import onnxruntime

    return {**describe(), "python": platform.python_version(), "bentoml": bentoml.__version__,
            "onnxruntime": onnxruntime.__version__}


def served_backends(port: int) -> dict[str, str]:
    """task -> backend, from a ConvForge server's /version."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=10) as response:
        return {task: model["backend"] for task, model in json.loads(response.read())["models"].items()}


def run_levels(chosen: list[Config], ports: dict[str, int], bodies: dict[str, bytes], args) -> list[dict]:
    """Every task and level, configs interleaved in `--rounds` short rounds per level."""
    rows = []
    for task in [t for t in TASKS if t in args.tasks]:
        configs = [c for c in chosen if task in c.tasks]
        for config in configs:
            measure(ports[config.name], f"/{task}", bodies[task], 8, 1.0, Sample())  # warm connections and caches
        for clients in args.levels if task == CLASSIFY else [lvl for lvl in args.levels if lvl in SCENE_LEVELS]:
            samples = {c.name: Sample() for c in configs}
            for _ in range(args.rounds):
                for config in configs:
                    measure(ports[config.name], f"/{task}", bodies[task], clients, args.duration / args.rounds,
                            samples[config.name])
            for config in configs:
                row = {"config": config.name, "task": task, "clients": clients, **samples[config.name].summary()}
                rows.append(row)
                print(f"  {config.name:22s} {task:8s} {clients:3d} clients {row['rps']:7.1f} req/s  "
                      f"p50 {row['p50_ms'] or 0:7.1f} ms  p99 {row['p99_ms'] or 0:7.1f} ms  {row['errors'] or ''}",
                      flush=True)
    return rows


def print_table(rows: list[dict], targets: dict, figures: dict) -> None:
    print("\n| config | task | clients | req/s | p50 ms | p99 ms | errors |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['config']} | {r['task']} | {r['clients']} | {r['rps']:.1f} | {r['p50_ms'] or 0:.1f} | "
              f"{r['p99_ms'] or 0:.1f} | {r['errors'] or ''} |")
    print()
    for name, item in targets.items():
        print(f"{name:28s} {item['value']!s:>8}  target {item['target']:8s} {'met' if item['met'] else 'MISSED'}")
    for name, value in figures.items():
        print(f"{name:28s} {value!s:>8}")


def serve_bare(models: str, port: int) -> None:
    import uvicorn

    app, _ = bare_app(Path(models))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def serve_override(text: str) -> tuple[str, object]:
    """A `--set` item: KEY=VALUE of params.yaml's serve section, the value read as YAML."""
    import yaml

    key, equals, value = text.partition("=")
    keys = yaml.safe_load((ROOT / "params.yaml").read_text())["serve"]
    if not equals or key not in keys:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY one of serve's {', '.join(keys)}; got {text!r}")
    return key, yaml.safe_load(value)


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=seconds, default=4.0, help="seconds per config and client level")
    parser.add_argument("--rounds", type=positive, default=2, help="alternating rounds each level is split into")
    parser.add_argument("--levels", type=positive, nargs="+", default=list(LEVELS))
    parser.add_argument("--configs", nargs="+", choices=[c.name for c in CONFIGS],
                        help="only these configurations (names as in the table)")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS), help="endpoints to measure")
    parser.add_argument("--set", type=serve_override, nargs="+", default=[], metavar="KEY=VALUE",
                        help="serve.* overrides for every configuration, e.g. max_latency_ms=200")
    parser.add_argument("--out", type=result_file, default=ROOT / "bench" / "results" / "serve.json")
    parser.add_argument("--bare", help=argparse.SUPPRESS)  # internal: serve a bare handler on --port
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        serve_bare(args.bare, args.port)
        return

    import yaml

    started = time.monotonic()
    info = machine()
    common = dict(args.set)
    chosen = [c for c in CONFIGS if not args.configs or c.name in args.configs]
    with tempfile.TemporaryDirectory(prefix="convforge-bench-serve-") as tmp:
        work = Path(tmp)
        models, sources = bench_models(work)
        sizes = {task: json.loads((models / task / "config.json").read_text())["image_size"] for task in TASKS}
        bodies = {task: png_payload(task, 28 if task == CLASSIFY else int(sizes[task])) for task in TASKS}
        processes: dict[str, subprocess.Popen] = {}
        ports = {c.name: free_port() for c in chosen}
        try:
            for config in chosen:
                params = write_params(work, config.name, {**config.serve, **common})
                processes[config.name] = launch(config, models, params, ports[config.name], work)
            for config in chosen:
                wait_ready(ports[config.name], processes[config.name], work / f"{config.name}.log")
            served = {c.name: served_backends(ports[c.name]) for c in chosen if c.kind == "bento"}
            print(f"[{time.monotonic() - started:4.0f}s] {len(chosen)} servers ready; served {served}", flush=True)
            rows = run_levels(chosen, ports, bodies, args)
        except RuntimeError as exc:  # a server did not come up: wait_ready's reason and its log's tail
            sys.exit(f"bench/serve.py: {exc}")
        finally:
            for process in processes.values():
                stop(process)
    targets, figures = verdict(rows), comparisons(rows)
    print_table(rows, targets, figures)
    serve = yaml.safe_load((ROOT / "params.yaml").read_text())["serve"]
    result = {"targets_met": all(item["met"] for item in targets.values()), "targets": targets,
              "figures": figures, "backends": backends(rows, served), "rows": rows,
              "machine": {**info, "load_avg_at_end": load_average()},
              "models": sources, "served_backends": served, "duration_s": args.duration, "rounds": args.rounds,
              "serve": {**{k: serve[k] for k in ("max_batch_size", "max_latency_ms", "max_concurrency", "timeout_s",
                                                 "num_threads", "workers")}, **common},
              "wall_s": round(time.monotonic() - started, 1)}
    runtime.write_json(args.out, result)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    stage_entry(main)()
