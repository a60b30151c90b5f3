"""Large uploads at once: a server's peak memory with its pixel budget against without, on a real `services.serve`.

    .venv/bin/python bench/upload_memory.py [--clients 16 32 64] [--side 4096] [--route detect]

For each count in `--clients`, that many clients post one `--side` px PNG each (about 0.4 MB: a
smooth gradient, small to send, 50 MB decoded) at the same moment, and retry after a 503's
Retry-After until they get another answer, so both servers do the same work. One server runs
`serve.max_pixels_in_flight` as params.yaml has it, the other with the budget off (memory then
bounded only by the body size, as before the budget); each count gets fresh servers. Peak memory
is the kernel's high-water mark (VmHWM) of the server's process tree: with the budget it should
stay flat as clients grow, without it grow with them. Writes bench/results/upload_memory.json.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)
from bench.machine import Parser, describe, load_average, positive, result_file  # noqa: E402
from pipelines.errors import stage_entry  # noqa: E402

UNBOUNDED = 10 ** 15  # serve.max_pixels_in_flight that no burst reaches: the budget off


def gradient_png(side: int) -> bytes:
    """A `side` x `side` RGB gradient: compresses to a fraction of a MB, decodes to side^2 x 3 bytes."""
    y, x = np.mgrid[0:side, 0:side]
    rgb = np.stack([x * 255 // side, y * 255 // side, (x + y) * 255 // (2 * side)], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    return buffer.getvalue()


def tree_peak_mb(root: int) -> float:
    """The largest VmHWM among `root` and its descendants (the server and its workers, which BentoML starts in
    sessions of their own), in MB."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for pid, ppid in (map(int, line.split()) for line in table.splitlines()):
        children.setdefault(ppid, []).append(pid)
    tree, peaks = [root], []
    while tree:
        pid = tree.pop()
        tree += children.get(pid, [])
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # ended meanwhile
            continue
        peaks += [int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM")]
    return round(max(peaks, default=0.0), 1)


def burst(port: int, route: str, data: bytes, clients: int) -> dict:
    """`clients` concurrent uploads, each retried after a 503's Retry-After: first answers, final answers, times."""
    import httpx

    def one(_: int) -> tuple[int, int, float]:
        started, first = time.perf_counter(), None
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            while True:
                reply = client.post(f"/{route}", files={"images": ("gradient.png", data, "image/png")})
                first = first or reply.status_code
                if reply.status_code != 503:
                    return first, reply.status_code, time.perf_counter() - started
                time.sleep(float(reply.headers.get("retry-after", "1")))

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(one, range(clients)))
    return {"first_answers": dict(Counter(str(a[0]) for a in answers)),
            "final_answers": dict(Counter(str(a[1]) for a in answers)),
            "wall_s": round(time.perf_counter() - started, 1), "slowest_s": round(max(a[2] for a in answers), 1)}


def main() -> None:
    from bench.serve import Config, bench_models, free_port, launch, stop, wait_ready, write_params
    from pipelines.params import load_params

    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=positive, nargs="+", default=[16, 32, 64])
    parser.add_argument("--side", type=positive, default=4096)
    parser.add_argument("--route", choices=["classify", "detect", "segment"], default="detect")
    parser.add_argument("--out", type=result_file, default=ROOT / "bench" / "results" / "upload_memory.json")
    args = parser.parse_args()
    serve = load_params(ROOT / "params.yaml").serve
    if args.side ** 2 > serve.max_pixels:
        parser.error(f"argument --side: {args.side} px is over serve.max_pixels ({serve.max_pixels:,}): every upload "
                     "would get 413")
    machine, data, budget = describe(), gradient_png(args.side), serve.max_pixels_in_flight
    print(f"payload: {args.side}x{args.side} PNG, {len(data) / 1e6:.2f} MB; {args.clients} clients on /{args.route}",
          flush=True)
    runs = [(clients, name, pixels) for clients in sorted(set(args.clients))
            for name, pixels in (("pixel budget", budget), ("no budget", UNBOUNDED))]
    rows = []
    with tempfile.TemporaryDirectory(prefix="convforge-bench-upload-memory-") as tmp:
        work = Path(tmp)
        models, source = bench_models(work)
        for clients, name, pixels in runs:
            config, port = Config(f"{name.replace(' ', '-')}-{clients}", "bento"), free_port()
            process = launch(config, models, write_params(work, config.name, {"max_pixels_in_flight": pixels}),
                             port, work)
            try:
                wait_ready(port, process, work / f"{config.name}.log")
                idle = tree_peak_mb(process.pid)
                row = {"server": name, "clients": clients,
                       "max_pixels_in_flight": pixels if pixels != UNBOUNDED else None,
                       "idle_peak_mb": idle, **burst(port, args.route, data, clients),
                       "peak_mb": tree_peak_mb(process.pid)}
            except RuntimeError as exc:  # the server did not come up: wait_ready's reason and the log's tail
                sys.exit(f"bench/upload_memory.py: {exc}")
            finally:
                stop(process)
            print(json.dumps(row), flush=True)
            rows.append(row)
    peaks = {(row["clients"], row["server"]): row["peak_mb"] for row in rows}
    ratios = {str(clients): round(peaks[clients, "no budget"] / peaks[clients, "pixel budget"], 2)
              for clients in sorted(set(args.clients))}
    result = {"payload": f"{args.side}x{args.side} PNG", "payload_mb": round(len(data) / 1e6, 2),
              "clients": sorted(set(args.clients)), "route": args.route, "model": source[args.route], "rows": rows,
              "peak_ratio": ratios, "machine": {**machine, "load_avg_at_end": load_average()}}
    print("peak memory without the budget / with it, by clients: "
          + ", ".join(f"{clients}: {ratio}x" for clients, ratio in ratios.items()))
    runtime.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    stage_entry(main)()
