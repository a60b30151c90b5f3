"""Adaptive batching in-process: BentoML's CORK dispatcher, the one behind `@bentoml.api(batchable=True)`.

The dispatcher is a private BentoML API (`bentoml._internal.marshal.dispatcher`), so it is
reached only here, and `check_dispatcher` (run by tests/services/test_batching.py) says clearly
when an installed BentoML has moved or changed it. Each request awaits its images' places in a
shared batch; a queue whose wait would pass `max_latency_ms` sheds the call through `fallback`.
"""

from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable, Sequence

DISPATCHER_MODULE = "bentoml._internal.marshal.dispatcher"
# The parameters ConvForge passes; a BentoML without them has changed the dispatcher.
DISPATCHER_PARAMETERS = ("max_latency_in_ms", "max_batch_size", "fallback", "get_batch_size")


class DispatcherMoved(ImportError):
    """The installed BentoML no longer has the CorkDispatcher this module was written against."""


def _dispatcher_class() -> type:
    import importlib

    import bentoml

    try:
        found = getattr(importlib.import_module(DISPATCHER_MODULE), "CorkDispatcher")
    except (ImportError, AttributeError) as exc:
        raise DispatcherMoved(f"BentoML moved CorkDispatcher: {DISPATCHER_MODULE}.CorkDispatcher is gone in "
                              f"bentoml {bentoml.__version__} ({exc}); update services/batching.py") from None
    return found


def check_dispatcher() -> type:
    """The CorkDispatcher class, or DispatcherMoved naming what changed."""
    import bentoml

    dispatcher = _dispatcher_class()
    parameters = inspect.signature(dispatcher.__init__).parameters
    missing = [name for name in DISPATCHER_PARAMETERS if name not in parameters]
    if missing:
        raise DispatcherMoved(f"BentoML moved CorkDispatcher: bentoml {bentoml.__version__}'s "
                              f"{DISPATCHER_MODULE}.CorkDispatcher takes no {', '.join(missing)}; "
                              "update services/batching.py")
    return dispatcher


def batched(run_batch: Callable[[Sequence[Any]], Sequence[Any]], max_latency_ms: int, max_batch_size: int,
            fallback: Callable[[], Any]) -> Callable[[Any], Awaitable[Any]]:
    """An async `submit(job)` that runs `run_batch` (in a thread) on batches of up to `max_batch_size` jobs;
    `fallback` is called instead when a job's queue wait would pass `max_latency_ms`."""
    dispatcher = check_dispatcher()(max_latency_ms, max_batch_size, fallback=fallback, get_batch_size=lambda job: 1)
    return dispatcher(run_batch)
