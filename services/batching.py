"""Adaptive batching in-process: BentoML's CORK dispatcher, the one behind `@bentoml.api(batchable=True)`.

The dispatcher is a private BentoML API (`bentoml._internal.marshal.dispatcher`), so it is
reached only here, and `check_dispatcher` (run by tests/services/test_batching.py) says clearly
when an installed BentoML has moved or changed it. (The module also holds the one other private BentoML
API the service uses, `bound_endpoint_labels`, at its end: the project keeps them in one place.) Each
request awaits its images' places in a shared batch; a queue whose wait would pass `max_latency_ms`
sheds the call through `fallback`.

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


# ---------------------------------------------------------------- bounded endpoint labels of BentoML's series
# The one other private BentoML API ConvForge relies on, kept here beside the dispatcher (the project keeps
# private APIs of its stack in this one module). BentoML's outermost middleware, its traffic metrics, labels
# every request series with the raw `scope["path"]`: each invented path (`/x<uuid>`, `/CLASSIFY`) would add
# series to /metrics for as long as the server runs. No user middleware runs before it (services/guard.py),
# so the class that ServiceAppFactory.middlewares imports from METRICS_MODULE when it builds the app is
# replaced by one that shows it a bounded path instead (services.guard.endpoint_label) and hands the real
# one on to everything inside it.
METRICS_MODULE = "bentoml._internal.server.http.instruments"
METRICS_CLASS = "RunnerTrafficMetricsMiddleware"
APP_MODULE = "_bentoml_impl.server.app"  # ServiceAppFactory: imports METRICS_CLASS from METRICS_MODULE per app
REAL_PATH = "convforge.path"  # the scope key that carries the real path past the metrics middleware


class MetricsMoved(ImportError):
    """The installed BentoML no longer labels its request series the way `bound_endpoint_labels` expects."""


def check_metrics_middleware() -> type:
    """BentoML's traffic metrics middleware class, or MetricsMoved naming what changed: it must read its
    `endpoint` label from `scope["path"]`, pass the scope on to `self.app`, and be imported by the app factory
    from METRICS_MODULE when an app is built (so replacing the module's class takes effect)."""
    import importlib

    import bentoml

    def moved(what: str) -> MetricsMoved:
        return MetricsMoved(f"BentoML moved its traffic metrics middleware: bentoml {bentoml.__version__}'s "
                            f"{what}; update services/batching.py bound_endpoint_labels")

    try:
        module, factory = importlib.import_module(METRICS_MODULE), importlib.import_module(APP_MODULE)
        middleware = getattr(module, METRICS_CLASS)
    except (ImportError, AttributeError) as exc:
        raise moved(f"{METRICS_MODULE}.{METRICS_CLASS} is gone ({exc})") from None
    middleware = getattr(middleware, "bentoml_class", middleware)  # ours already installed: check BentoML's
    call = inspect.getsource(middleware.__call__)
    if 'endpoint = scope["path"]' not in call or "self.app(scope" not in call:
        raise moved(f"{METRICS_CLASS}.__call__ no longer labels with scope['path'] and calls self.app(scope, ...)")
    built = inspect.getsource(factory.ServiceAppFactory)
    if METRICS_MODULE not in built or METRICS_CLASS not in built:
        raise moved(f"{APP_MODULE}.ServiceAppFactory no longer imports {METRICS_CLASS} from {METRICS_MODULE}")
    return middleware


def bound_endpoint_labels(label: Callable[[dict], str]) -> None:
    """Make the apps BentoML builds from now on label their request series with `label(scope)` instead of the
    raw path (idempotent); everything inside the metrics middleware still sees the real path."""
    import importlib

    module = importlib.import_module(METRICS_MODULE)
    base = check_metrics_middleware()
    setattr(module, METRICS_CLASS, _bounded(base, label))


def _bounded(base: type, label: Callable[[dict], str]) -> type:
    """`base` (BentoML's metrics middleware) shown `label(scope)` as the path, the real one restored inside."""

    class BoundedPathMetrics(base):
        bentoml_class = base

        def __init__(self, app: Any, **options: Any) -> None:
            super().__init__(_RealPath(app), **options)

        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            path = scope.get("path")
            shown = label(scope) if scope["type"].startswith(("http", "websocket")) and path != "/metrics" else path
            if shown != path:
                scope = {**scope, "path": shown, REAL_PATH: path}
            await super().__call__(scope, receive, send)

    return BoundedPathMetrics


class _RealPath:
    """The app inside the metrics middleware, given the request's real path back."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if REAL_PATH in scope:
            real = scope[REAL_PATH]
            scope = {key: value for key, value in scope.items() if key != REAL_PATH}
            scope["path"] = real
        await self.app(scope, receive, send)
