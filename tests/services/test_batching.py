"""services/batching.py: BentoML's CorkDispatcher is where it was, takes what we pass, and batches."""

from __future__ import annotations

import asyncio

import pytest

from services.batching import DispatcherMoved, batched, check_dispatcher


def test_the_installed_bentoml_still_has_the_dispatcher() -> None:
    try:
        check_dispatcher()
    except DispatcherMoved as exc:
        pytest.fail(str(exc))  # "BentoML moved CorkDispatcher: ..." names the version and what changed


def test_concurrent_jobs_share_batches_and_get_their_own_answers() -> None:
    sizes = []

    def double(jobs):
        sizes.append(len(jobs))
        return [2 * job for job in jobs]

    async def main():
        submit = batched(double, max_latency_ms=5000, max_batch_size=8, fallback=lambda: None)
        return await asyncio.gather(*(submit(i) for i in range(32)))

    assert asyncio.run(main()) == [2 * i for i in range(32)]
    assert max(sizes) > 1 and max(sizes) <= 8


def test_a_moved_dispatcher_is_one_clear_error(monkeypatch) -> None:
    import services.batching as batching

    monkeypatch.setattr(batching, "DISPATCHER_MODULE", "bentoml._internal.marshal.nowhere")
    with pytest.raises(DispatcherMoved, match="BentoML moved CorkDispatcher: .*nowhere"):
        check_dispatcher()


def test_a_lone_quick_job_after_a_burst_runs_at_once_on_the_loop() -> None:
    """BentoML's optimizer would hold a lone job open for as long as past jobs waited; here it goes at once,
    and, once the dispatcher has trained and the forward is quick, without a hop to a worker thread."""
    import threading

    seen = []

    def run(jobs):
        seen.append((len(jobs), threading.get_ident()))
        return list(jobs)

    async def main():
        submit = batched(run, max_latency_ms=5000, max_batch_size=8, fallback=lambda: None)
        for _ in range(3):
            await asyncio.gather(*(submit(i) for i in range(32)))  # bursts: batches form and train the dispatcher
        await submit(-1)  # the first lone job measures a one-job forward
        seen.clear()
        return [await submit(i) for i in range(5)]

    assert asyncio.run(main()) == list(range(5))
    assert seen == [(1, threading.get_ident())] * 5


def test_a_slow_lone_job_runs_in_a_worker_thread() -> None:
    import threading
    import time

    from services.batching import INLINE_FORWARD_S

    threads = []

    def slow(jobs):
        time.sleep(2 * INLINE_FORWARD_S)
        threads.append(threading.get_ident())
        return list(jobs)

    async def main():
        submit = batched(slow, max_latency_ms=5000, max_batch_size=4, fallback=lambda: None)
        for i in range(15):
            await submit(i)

    asyncio.run(main())
    assert threading.get_ident() not in threads


def test_a_queue_past_its_latency_budget_sheds_through_fallback() -> None:
    import time

    def slow(jobs):
        time.sleep(0.02)
        return list(jobs)

    async def main():
        submit = batched(slow, max_latency_ms=50, max_batch_size=2, fallback=lambda: "shed")
        for i in range(12):
            await submit(i)  # trains the latency model: ~20 ms a batch
        return await asyncio.gather(*(submit(i) for i in range(40)))

    answers = asyncio.run(main())
    assert "shed" in answers and any(answer != "shed" for answer in answers)


def test_jobs_of_a_cancelled_caller_never_run_and_the_caller_stays_cancelled() -> None:
    """BentoML's 504 cancels a request while its images wait for a batch: the batch skips them (no forward for
    nobody), and the request ends cancelled rather than with the fallback's answer."""
    import time

    ran = []

    def run(jobs):
        time.sleep(0.2 if "busy" in jobs else 0.0)  # the model busy with another batch meanwhile
        ran.extend(jobs)
        return list(jobs)

    async def main():
        submit = batched(run, max_latency_ms=60_000, max_batch_size=8, fallback=lambda: "shed")
        busy = asyncio.ensure_future(submit("busy"))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(asyncio.gather(submit("gone-1"), submit("gone-2")))
        await asyncio.sleep(0.05)
        gone.cancel()
        kept = await asyncio.gather(busy, submit("kept"))
        return kept, await asyncio.gather(gone, return_exceptions=True)

    kept, (outcome,) = asyncio.run(main())
    assert kept == ["busy", "kept"] and sorted(ran) == ["busy", "kept"], ran
    assert isinstance(outcome, asyncio.CancelledError), outcome


def test_the_latency_estimate_weighs_jobs_by_cost_and_not_the_callers_own() -> None:
    """A job's cost (a native upload's pixels) weighs in the queue's estimate: 8 dear jobs of other callers shed,
    8 cheap ones do not, and a caller's own dear jobs never shed it (the estimate used to count jobs)."""
    import time

    def run(jobs):
        time.sleep(0.01 * sum(jobs))  # 10 ms a unit of cost
        return list(jobs)

    async def main():
        submit = batched(run, max_latency_ms=100, max_batch_size=8, fallback=lambda: "shed", cost=float)
        for cost in [1, 4] * 8:
            await submit(cost)  # trains the model: 10 ms a unit
        own = await asyncio.gather(*(submit(4, owner="one request") for _ in range(8)))
        cheap = await asyncio.gather(*(submit(1, owner=index) for index in range(8)))
        dear = await asyncio.gather(*(submit(4, owner=index) for index in range(8)))
        return own, cheap, dear

    own, cheap, dear = asyncio.run(main())
    assert "shed" not in own and "shed" not in cheap, (own, cheap)
    assert "shed" in dear and 4 in dear, dear
