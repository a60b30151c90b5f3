"""services/budget.py and the service's use of it: the decoded pixels in flight stay under the budget, a request
alone always runs, and a request cancelled by BentoML's timeout stops at its next upload, its pixels held until
its worker thread has let go of them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from services.budget import PixelBudget
from services.errors import Overloaded


def test_the_budget_admits_what_fits_and_any_request_alone():
    budget = PixelBudget(100)
    first, second = budget.claim(), budget.claim()
    first.hold(60)
    with pytest.raises(Overloaded, match="over 100 decoded pixels in flight"):
        second.hold(50)
    second.hold(40)
    first.release()
    second.release()
    assert budget.held == 0
    alone = budget.claim()
    alone.hold(500)
    alone.hold(500)  # alone it holds what it needs: any request within the per-image limits runs
    with pytest.raises(Overloaded):
        budget.claim().hold(1)
    alone.release()
    assert budget.held == 0


def test_a_cancelled_request_stops_at_its_next_upload_and_holds_its_pixels_until_its_thread_ends():
    from services.service import _in_thread

    budget = PixelBudget(10**6)
    claim, decoded = budget.claim(), []

    def decode_each() -> None:  # what the service's _prepare does per upload
        for index in range(5):
            with claim.holding(1000):
                time.sleep(0.1)
                decoded.append(index)

    async def main() -> tuple[int, list[int]]:
        request = asyncio.ensure_future(_in_thread(claim, decode_each))
        await asyncio.sleep(0.15)
        request.cancel()  # BentoML's timeout, mid-upload 1
        await asyncio.sleep(0)
        held = budget.held
        with pytest.raises(asyncio.CancelledError):
            await request
        return held, list(decoded)

    held, when_answered = asyncio.run(main())
    assert held == 1000  # upload 1 still decoding: its pixels still held
    assert when_answered == decoded == [0, 1] and budget.held == 0  # no upload 2; the thread ended first


def test_each_header_is_read_once_before_its_decode(monkeypatch):
    """A small /reconstruct request's headers, images' and targets' alike, are read once on the event loop: to
    choose to decode there, and for the pixels its claim holds (a header read costs ~12 us a file)."""
    import io
    from types import SimpleNamespace

    from PIL import Image

    from services import imaging
    from services.endpoints import Fit
    from services.imaging import fit_square
    from services.schemas import Options
    from services.service import ConvForge

    def png(side: int) -> bytes:
        out = io.BytesIO()
        Image.new("L", (side, side), side).save(out, format="PNG")
        return out.getvalue()

    reads, read = [], imaging.decoded_pixels
    monkeypatch.setattr(imaging, "decoded_pixels", lambda blob, *args: reads.append(blob) or read(blob, *args))
    service = SimpleNamespace(limits=imaging.DecodeLimits(max_pixels=10**6, formats=("PNG",)))
    service._prepare = ConvForge.inner._prepare.__get__(service)
    runner = SimpleNamespace(fit=Fit(fit_square, 28, "short"), in_channels=1, task="reconstruct",
                             card=SimpleNamespace(version="v1"))
    images, targets = [png(30), png(40)], [png(31), png(41)]
    options = Options().model_copy(update={"targets": targets})
    claim = PixelBudget(10**6).claim()
    pixels = ConvForge.inner._inline_pixels(service, runner, images, options)
    assert pixels == ([30 * 30, 40 * 40], 31 * 31 + 41 * 41)
    prepared, loaded = ConvForge.inner._load(service, runner, images, options, claim, pixels)
    assert sorted(reads, key=len) == sorted(images + targets, key=len)  # each header once
    assert [item.array.shape for item in prepared] == [(28, 28, 1)] * 2 and len(loaded.targets) == 2
    claim.release()


FREED_MEMORY_PROBE = """
import sys, threading
from PIL import Image
from services import budget
def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
applied = budget.return_freed_memory() if sys.argv[1] == "returned" else False
before = rss_mb()
def decode_one():  # what a worker thread holds for a 4096 px upload: the decoded image, its input, its bytes
    image = Image.new("RGB", (4096, 4096), (1, 2, 3))
    image.resize((64, 64)), image.tobytes()
for _ in range(8):  # eight rounds of four uploads at once, as the budget admits them
    threads = [threading.Thread(target=decode_one) for _ in range(4)]
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
print(applied, rss_mb() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_the_pixels_given_back_leave_the_process():
    """After 32 large decodes on worker threads, each freed, the worker keeps none of their memory (2-3 MB; without
    return_freed_memory glibc kept 50-67 MB in its arenas, and the peak grew with the threads that had decoded)."""
    import ctypes
    import subprocess
    import sys

    if not hasattr(ctypes.CDLL(None), "mallopt"):
        pytest.skip("not glibc: no mallopt")
    run = subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE, "returned"], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[2])
    applied, kept_mb = run.stdout.split()
    assert applied == "True" and int(kept_mb) < 24, (run.stdout, run.stderr[-2000:])
