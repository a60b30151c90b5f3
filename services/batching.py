"""Adaptive batching in-process: BentoML's CORK dispatcher, the one behind `@bentoml.api(batchable=True)`.

The dispatcher is a private BentoML API (`bentoml._internal.marshal.dispatcher`), so it is
reached only here, and `check_dispatcher` (run by tests/services/test_batching.py) says clearly
when an installed BentoML has moved or changed it. Each request awaits its images' places in a
shared batch; a queue whose wait would pass `max_latency_ms` sheds the call through `fallback`.

Three choices differ from BentoML's defaults (bench/serve.py measures them):
- A batch goes as soon as the model is free. BentoML's optimizer holds a lone request open for
  company as long as the average past wait, which feeds on itself (after one busy minute every
  single request waited tens of milliseconds for nobody). Under load, batches still form while
  the previous batch runs.
- A lone job whose one-job forward has been measured under `INLINE_FORWARD_S` runs on the event
  loop at once when nothing is queued or running (no dispatcher round trip), and so does a
  one-job batch the dispatcher sends: the hop to a worker thread and back costs more than such a
  forward on a busy 2-core box. Larger or slower batches run in a worker thread, so the loop
  keeps decoding meanwhile.
- The latency model that decides shedding (BentoML's) is refitted every second on the last 16
  batches instead of every 5 s on 50, so it forgets an overload (batches crawling behind a
  saturated event loop) before it sheds the normal traffic that follows.
"""

from __future__ import annotations

import functools
import inspect
import time
from typing import Any, Awaitable, Callable, Sequence

DISPATCHER_MODULE = "bentoml._internal.marshal.dispatcher"
# The parameters ConvForge passes; a BentoML without them has changed the dispatcher.
DISPATCHER_PARAMETERS = ("max_latency_in_ms", "max_batch_size", "fallback", "get_batch_size")
# What ConvForge reads or pins on a dispatcher and its latency model (`Optimizer`).
DISPATCHER_ATTRIBUTES = ("optimizer", "_queue", "_sema", "max_latency")
OPTIMIZER_ATTRIBUTES = ("wait", "trigger_refresh", "N_KEPT_SAMPLE", "INTERVAL_REFRESH_PARAMS")
INLINE_FORWARD_S = 0.005  # a one-job batch measured faster than this runs on the event loop
# CorkDispatcher.controller trains its latency model on its first 8 + 1 + 1 + 1 batches; lone jobs take
# the direct path only after that, so the service's warm-up calls still train it.
TRAINING_BATCHES = 11


class DispatcherMoved(ImportError):
    """The installed BentoML no longer has the CorkDispatcher this module was written against."""


def _moved(what: str) -> DispatcherMoved:
    import bentoml

    return DispatcherMoved(f"BentoML moved CorkDispatcher: bentoml {bentoml.__version__}'s {DISPATCHER_MODULE} "
                           f"{what}; update services/batching.py")


def _private(name: str) -> type:
    import importlib

    try:
        return getattr(importlib.import_module(DISPATCHER_MODULE), name)
    except (ImportError, AttributeError) as exc:
        raise _moved(f"has no {name} ({exc})") from None


def check_dispatcher() -> type:
    """The CorkDispatcher class, or DispatcherMoved naming what changed."""
    dispatcher = _private("CorkDispatcher")
    parameters = inspect.signature(dispatcher.__init__).parameters
    missing = [name for name in DISPATCHER_PARAMETERS if name not in parameters]
    latency_model = _private("Optimizer")(1.0)
    missing += [f"Optimizer.{name}" for name in OPTIMIZER_ATTRIBUTES if not hasattr(latency_model, name)]
    if missing:
        raise _moved(f"CorkDispatcher takes or has no {', '.join(missing)}")
    return dispatcher


@functools.cache
def _send_when_free() -> type:
    """BentoML's Optimizer (its latency model decides shedding) with the hold-open wait pinned at 0."""

    class SendWhenFree(_private("Optimizer")):
        # BentoML fits its model on the last 50 batches, refitted at most every 5 s: after an overload (when
        # batches crawl behind a saturated event loop) it kept shedding normal traffic for seconds.
        N_KEPT_SAMPLE = 16
        INTERVAL_REFRESH_PARAMS = 1

        def trigger_refresh(self) -> None:
            super().trigger_refresh()
            self.wait = 0.0

    return SendWhenFree


class _ForwardClock:
    """How long a one-job batch takes: rises at once on a slow one, decays slowly on fast ones."""

    def __init__(self) -> None:
        self.single_s = float("inf")
        self.batches = 0

    def timed(self, run_batch: Callable[[Sequence[Any]], Sequence[Any]]) -> Callable[[Sequence[Any]], Sequence[Any]]:
        def run(jobs: Sequence[Any]) -> Sequence[Any]:
            start = time.perf_counter()
            outputs = run_batch(jobs)
            self.batches += 1
            if len(jobs) == 1:
                took = time.perf_counter() - start
                self.single_s = took if took > self.single_s or self.single_s == float("inf") else (
                    0.8 * self.single_s + 0.2 * took)
            return outputs

        return run


def batched(run_batch: Callable[[Sequence[Any]], Sequence[Any]], max_latency_ms: int, max_batch_size: int,
            fallback: Callable[[], Any]) -> Callable[[Any], Awaitable[Any]]:
    """An async `submit(job)` that runs `run_batch` on batches of up to `max_batch_size` jobs (in a thread,
    or inline for a quick lone job); `fallback` is called instead when a job's queue wait would pass
    `max_latency_ms`."""
    import anyio.to_thread

    dispatcher = check_dispatcher()(max_latency_ms, max_batch_size, fallback=fallback, get_batch_size=lambda job: 1)
    absent = [name for name in DISPATCHER_ATTRIBUTES if not hasattr(dispatcher, name)]
    if absent:
        raise _moved(f"CorkDispatcher instances have no {', '.join(absent)}")
    dispatcher.optimizer = _send_when_free()(dispatcher.max_latency)
    clock = _ForwardClock()
    run = clock.timed(run_batch)

    async def call(jobs: Sequence[Any]) -> Sequence[Any]:
        if len(jobs) == 1 and not dispatcher._queue and clock.single_s <= INLINE_FORWARD_S:
            return run(jobs)
        return await anyio.to_thread.run_sync(run, jobs)

    queued = dispatcher(call)

    async def submit(job: Any) -> Any:
        # Idle, trained and quick: run now, on the loop (nothing can start a batch before this returns).
        idle = not dispatcher._queue and not dispatcher._sema.is_locked()
        if idle and clock.batches >= TRAINING_BATCHES and clock.single_s <= INLINE_FORWARD_S:
            return run((job,))[0]
        return await queued(job)

    return submit
