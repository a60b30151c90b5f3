"""services/budget.py and the service's use of it: the decoded pixels in flight stay under the budget, a request
alone always runs, and a request cancelled by BentoML's timeout stops at its next upload, its pixels held until
its worker thread has let go of them."""

from __future__ import annotations

import asyncio
import time

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
