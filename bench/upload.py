"""A phone photo's upload cost: a 12 MP JPEG on /classify at 1 client, against a real `python -m services.serve`.

    .venv/bin/python bench/upload.py [--requests 30] [--json]

The server decodes the JPEG drafted near the model's input size (pipelines/decode.py) instead of at
full size. Target: median <= 30 ms. Writes bench/results/upload.json.
"""
import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)


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


def main() -> None:
    import base64

    import httpx

    from bench.serve import bench_models, free_port, start, stop, write_params

    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--json", action="store_true", help="base64 JSON instead of a multipart upload")
    args = parser.parse_args()
    data = photo_12mp()
    print(f"payload: 4000x3000 JPEG, {len(data) / 1e6:.2f} MB", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models, source = bench_models(work)
        print("models:", source, flush=True)
        port = free_port()
        process = start("bento", models, write_params(work, "b12"), port, work / "server.log")
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                kw = ({"json": {"images": [base64.b64encode(data).decode()]}} if args.json
                      else {"files": {"images": ("photo.jpg", data, "image/jpeg")}})
                for _ in range(5):
                    assert client.post("/classify", **kw).status_code == 200
                times = []
                for _ in range(args.requests):
                    t = time.perf_counter()
                    reply = client.post("/classify", **kw)
                    times.append((time.perf_counter() - t) * 1000)
                    assert reply.status_code == 200, reply.text
                print("result:", {k: reply.json()["results"][0].get(k)
                                  for k in ("width", "height", "in_domain", "reason")})
                metrics = client.get("/metrics").text
                pre = [l for l in metrics.splitlines()
                       if l.startswith("convforge_preprocess_seconds_sum") and "classify" in l]
                cnt = [l for l in metrics.splitlines()
                       if l.startswith("convforge_preprocess_seconds_count") and "classify" in l]
        finally:
            stop(process)
    times.sort()
    result = {"payload": "4000x3000 JPEG", "payload_mb": round(len(data) / 1e6, 2), "clients": 1,
              "body": "json" if args.json else "multipart", "requests": len(times),
              "median_ms": round(statistics.median(times), 1), "p90_ms": round(times[int(0.9 * len(times)) - 1], 1),
              "min_ms": round(times[0], 1), "target_median_ms": 30.0}
    if pre and cnt:
        result["server_preprocess_ms"] = round(float(pre[0].split()[-1]) / float(cnt[0].split()[-1]) * 1000, 1)
    result["met"] = result["median_ms"] <= result["target_median_ms"]
    print(f"/classify 12 MP JPEG, 1 client: {json.dumps(result)}")
    runtime.write_json(ROOT / "bench" / "results" / "upload.json", result)


if __name__ == "__main__":
    main()
