"""A phone photo's upload cost: a 12 MP JPEG on /classify at 1 client, against a real `python -m services.serve`.

    .venv/bin/python bench/upload.py [--requests 30] [--json]

The server decodes the JPEG drafted near the model's input size (pipelines/decode.py) instead of at
full size. Target: median <= 30 ms. Writes bench/results/upload.json.
"""
from __future__ import annotations

import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)
from bench.machine import Parser, describe, load_average, positive, result_file  # noqa: E402
from pipelines.errors import stage_entry  # noqa: E402

TARGET_MEDIAN_MS = 30.0


def photo_12mp() -> bytes:
    """4000x3000 photo-like JPEG (multi-scale texture + sensor noise, quality 90): ~3-5 MB like a phone's."""
    rng = np.random.default_rng(0)
    h, w = 3000, 4000
    acc = np.zeros((h, w, 3), np.float32)
    for scale, amp in ((500, 90), (100, 45), (20, 25), (4, 12)):
        small = rng.random((h // scale + 1, w // scale + 1, 3)).astype(np.float32)
        up = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
        acc += (up / 255 - 0.5) * amp
    acc += 128 + rng.normal(0, 3, (h, w, 3)).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def upload_times(port: int, data: bytes, as_json: bool, requests: int) -> tuple[list[float], dict, str]:
    """`requests` timed /classify calls (after 5 untimed ones) in ms, the last answer and the server's /metrics."""
    import base64

    import httpx

    body = ({"json": {"images": [base64.b64encode(data).decode()]}} if as_json
            else {"files": {"images": ("photo.jpg", data, "image/jpeg")}})
    times = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        for timed in [False] * 5 + [True] * requests:
            started = time.perf_counter()
            reply = client.post("/classify", **body)
            if reply.status_code != 200:
                sys.exit(f"bench/upload.py: /classify answered {reply.status_code}: {reply.text[:300]}")
            if timed:
                times.append((time.perf_counter() - started) * 1000)
        return sorted(times), reply.json()["results"][0], client.get("/metrics").text


def preprocess_ms(metrics: str) -> float | None:
    """The server's mean classify parse + decode + resize time, from its Prometheus histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = {sample.name: sample.value for family in text_string_to_metric_families(metrics)
              if family.name == "convforge_preprocess_seconds" for sample in family.samples
              if sample.labels.get("task") == "classify" and sample.name.endswith(("_sum", "_count"))}
    seconds, count = totals.get("convforge_preprocess_seconds_sum"), totals.get("convforge_preprocess_seconds_count")
    return round(seconds / count * 1000, 1) if seconds is not None and count else None


def main() -> None:
    from bench.serve import Config, bench_models, free_port, launch, stop, wait_ready, write_params

    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=positive, default=30)
    parser.add_argument("--json", action="store_true", help="base64 JSON instead of a multipart upload")
    parser.add_argument("--out", type=result_file, default=ROOT / "bench" / "results" / "upload.json")
    args = parser.parse_args()
    machine = describe()
    data = photo_12mp()
    print(f"payload: 4000x3000 JPEG, {len(data) / 1e6:.2f} MB", flush=True)
    with tempfile.TemporaryDirectory(prefix="convforge-bench-upload-") as tmp:
        work = Path(tmp)
        models, source = bench_models(work)
        print("models:", source, flush=True)
        config, port = Config("bento", "bento"), free_port()
        process = launch(config, models, write_params(work, config.name, {}), port, work)
        try:
            wait_ready(port, process, work / f"{config.name}.log")
            times, answer, metrics = upload_times(port, data, args.json, args.requests)
        except RuntimeError as exc:  # the server did not come up: wait_ready's reason and the log's tail
            sys.exit(f"bench/upload.py: {exc}")
        finally:
            stop(process)
    print("answer:", {key: answer.get(key) for key in ("width", "height", "in_domain", "reason")})
    result = {"payload": "4000x3000 JPEG", "payload_mb": round(len(data) / 1e6, 2), "clients": 1,
              "body": "json" if args.json else "multipart", "requests": len(times),
              "median_ms": round(statistics.median(times), 1), "p90_ms": round(times[int(0.9 * len(times)) - 1], 1),
              "min_ms": round(times[0], 1), "target_median_ms": TARGET_MEDIAN_MS,
              "server_preprocess_ms": preprocess_ms(metrics), "model": source["classify"],
              "machine": {**machine, "load_avg_at_end": load_average()}}
    result["met"] = result["median_ms"] <= TARGET_MEDIAN_MS
    print(f"/classify 12 MP JPEG, 1 client: {json.dumps(result)}")
    runtime.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    stage_entry(main)()
