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
- That model counts cost, not jobs: BentoML fits a batch's seconds to its number of jobs and
  estimates a queue of n jobs as n of them, which holds only while every job costs the same. With
  `serve.scale: native` one upload is 1,000 times another's pixels: after one large image every
  small one looked a second long (503s on an idle server). Each job carries its cost (the runner's:
  pixels over the training input's), batches are fitted on their summed cost, and the queue is
  estimated by the summed cost of the jobs of other callers than its oldest's (`owner`): a request
  is shed for the work queued beside it, never for its own images' (a lone large one is served).
- A job whose caller has left (BentoML's 504 cancelled it) is skipped when its batch runs, and the
  caller stays cancelled (BentoML's dispatcher would answer it with the fallback instead).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

DISPATCHER_MODULE = "bentoml._internal.marshal.dispatcher"
# The parameters ConvForge passes; a BentoML without them has changed the dispatcher.
DISPATCHER_PARAMETERS = ("max_latency_in_ms", "max_batch_size", "fallback", "get_batch_size")
# What ConvForge reads or pins on a dispatcher and its latency model (`Optimizer`).
DISPATCHER_ATTRIBUTES = ("optimizer", "_queue", "_sema", "max_latency")
OPTIMIZER_ATTRIBUTES = ("wait", "trigger_refresh", "log_outbound", "o_a", "N_KEPT_SAMPLE", "INTERVAL_REFRESH_PARAMS")
# What the cost model relies on in BentoML's source: the controller's estimate of its queue (n jobs at o_a each,
# the oldest job's `data` first in `_queue`) and the batch sizes it logs.
DISPATCHER_SOURCE = {"controller": ("n = len(self._queue)", "a = self.optimizer.o_a", "latency_0 = w0 + a * n + b"),
                     "outbound_call": ("self.optimizer.log_outbound(",), "inbound_call": ("Job(now, data, future)",)}
INLINE_FORWARD_S = 0.005  # a job whose forward is estimated faster than this runs alone on the event loop
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
    missing += [f"{method}: {line}" for method, lines in DISPATCHER_SOURCE.items()
                for line in lines if line not in inspect.getsource(getattr(dispatcher, method))]
    if missing:
        raise _moved(f"CorkDispatcher takes or has no {', '.join(missing)}")
    return dispatcher


@dataclass(eq=False)
class _Ticket:
    """A job in the dispatcher's queue: its cost, its caller (`owner`), and its `state`: queued, running (a batch
    took it) or dropped (shed, or its caller left: its batch skips it)."""

    job: Any
    cost: float
    owner: Any
    state: str = "queued"


class _QueueCost:
    """The summed cost of a dispatcher's queued jobs, in all and per owner (`jobs`: the dispatcher's queue)."""

    def __init__(self, jobs: Sequence[Any]) -> None:
        self.jobs = jobs
        self.by_owner: dict[Any, tuple[float, int]] = {}  # owner -> (cost, jobs) still queued

    def add(self, ticket: _Ticket, sign: int = 1) -> None:
        """Count `ticket` in (sign 1) or out (-1)."""
        cost, count = self.by_owner.get(ticket.owner, (0.0, 0))
        if count + sign:
            self.by_owner[ticket.owner] = (cost + sign * ticket.cost, count + sign)
        else:
            self.by_owner.pop(ticket.owner, None)

    def others_per_job(self) -> float:
        """The cost queued by other callers than the oldest job's, per queued job (1 when nothing is queued)."""
        if not self.jobs:
            return 1.0
        oldest = self.jobs[0].data.owner
        return sum(cost for owner, (cost, _) in self.by_owner.items() if owner != oldest) / len(self.jobs)


@functools.cache
def _by_cost() -> type:
    """BentoML's Optimizer (its latency model decides shedding) with the hold-open wait pinned at 0, fitted on
    the summed cost of each batch and estimating its queue by cost (the module docstring says why)."""

    class ByCost(_private("Optimizer")):
        # BentoML fits its model on the last 50 batches, refitted at most every 5 s: after an overload (when
        # batches crawl behind a saturated event loop) it kept shedding normal traffic for seconds.
        N_KEPT_SAMPLE = 16
        INTERVAL_REFRESH_PARAMS = 1
        unit_s = 0.0  # the fitted seconds per unit of cost (BentoML's o_a, which is per job)
        batch_cost = 0.0  # the summed cost of the batch that runs (what BentoML logs as its number of jobs)
        queue: _QueueCost  # set by `batched`

        @property
        def o_a(self) -> float:
            """What BentoML's controller multiplies its n queued jobs by: the seconds of the cost that others than
            the oldest job's caller queued, per job."""
            return self.unit_s * self.queue.others_per_job()

        @o_a.setter
        def o_a(self, seconds_per_unit: float) -> None:
            self.unit_s = seconds_per_unit

        def log_outbound(self, n: int, wait: float, duration: float) -> None:
            if self.batch_cost:  # a batch whose callers had all left ran nothing
                super().log_outbound(self.batch_cost, wait, duration)

        def trigger_refresh(self) -> None:
            super().trigger_refresh()
            self.wait = 0.0

    return ByCost


class _ForwardClock:
    """Seconds per unit of cost of a one-job batch: rises at once on a slow one, decays slowly on fast ones."""

    def __init__(self) -> None:
        self.unit_s = float("inf")
        self.batches = 0

    def quick(self, ticket: _Ticket) -> bool:
        """Whether `ticket` alone is estimated to run within INLINE_FORWARD_S."""
        return self.unit_s * ticket.cost <= INLINE_FORWARD_S

    def timed(self, run_batch: Callable[[Sequence[Any]], Sequence[Any]]) -> Callable[[Sequence[_Ticket]], Any]:
        def run(tickets: Sequence[_Ticket]) -> Sequence[Any]:
            start = time.perf_counter()
            outputs = run_batch(tuple(ticket.job for ticket in tickets))
            self.batches += 1
            if len(tickets) == 1:
                took = (time.perf_counter() - start) / tickets[0].cost
                self.unit_s = took if took > self.unit_s or self.unit_s == float("inf") else (
                    0.8 * self.unit_s + 0.2 * took)
            return outputs

        return run


def batched(run_batch: Callable[[Sequence[Any]], Sequence[Any]], max_latency_ms: int, max_batch_size: int,
            fallback: Callable[[], Any], cost: Callable[[Any], float] = lambda job: 1.0
            ) -> Callable[..., Awaitable[Any]]:
    """An async `submit(job, owner=None)` that runs `run_batch` on batches of up to `max_batch_size` jobs (in a
    thread, or inline for a quick lone job); `fallback` is called instead when the queue's estimated latency
    would pass `max_latency_ms`. `cost(job)`: its weight in that estimate (1 each: BentoML's count of jobs);
    `owner`: its caller (a request), whose own jobs never count against it."""
    import anyio.to_thread

    dispatcher = check_dispatcher()(max_latency_ms, max_batch_size, fallback=fallback, get_batch_size=lambda job: 1)
    absent = [name for name in DISPATCHER_ATTRIBUTES if not hasattr(dispatcher, name)]
    if absent:
        raise _moved(f"CorkDispatcher instances have no {', '.join(absent)}")
    queue = _QueueCost(dispatcher._queue)
    dispatcher.optimizer = model = _by_cost()(dispatcher.max_latency)
    model.queue = queue
    clock = _ForwardClock()
    run = clock.timed(run_batch)

    async def call(tickets: Sequence[_Ticket]) -> list[Any]:
        running = [ticket for ticket in tickets if ticket.state == "queued"]  # not those whose callers left
        for ticket in running:
            ticket.state = "running"
            queue.add(ticket, -1)
        model.batch_cost = sum(ticket.cost for ticket in running)
        if len(running) == 1 and not dispatcher._queue and clock.quick(running[0]):
            outputs = iter(run(running))
        else:
            outputs = iter(await anyio.to_thread.run_sync(run, running) if running else ())
        return [next(outputs) if ticket.state == "running" else None for ticket in tickets]

    queued = dispatcher(call)

    async def submit(job: Any, owner: Any = None) -> Any:
        ticket = _Ticket(job, cost(job), owner)
        # Idle, trained and quick: run now, on the loop (nothing can start a batch before this returns).
        idle = not dispatcher._queue and not dispatcher._sema.is_locked()
        if idle and clock.batches >= TRAINING_BATCHES and clock.quick(ticket):
            return run((ticket,))[0]
        queue.add(ticket)
        try:
            return await queued(ticket)
        finally:
            if ticket.state == "queued":  # shed, or its caller left (it stays in BentoML's queue, skipped)
                ticket.state = "dropped"
                queue.add(ticket, -1)
            # BentoML's dispatcher answers a cancelled caller with `fallback`: it stays cancelled instead.
            if asyncio.current_task().cancelling():
                raise asyncio.CancelledError  # noqa: B012

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
