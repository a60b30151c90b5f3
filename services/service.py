"""The ConvForge BentoML service: one `@bentoml.api` per task (POST /classify, /detect, /segment), GET /version.

The service class loads each task's model once in `__init__` (BentoML model store, or
CONVFORGE_MODELS_DIR in development), warms every model up in the background, and only then
answers /readyz. The prediction apis are made from the task table, one per entry of
pipelines.tasks.TASKS at services.endpoints.ROUTES (`task_api`), so a new task needs no service
code, BentoML's clients call them by name (`bentoml.SyncHTTPClient(url).classify(images=[path],
top_k=3)`) and /schema.json and /docs.json list them. Each takes multipart uploads (repeatable
file field `images`) or JSON with base64 strings; services.payloads.PredictionRequest reads both
with the project's hardened reader, never with BentoML's file parsing, and a bad request is
answered as one-line JSON with its 4xx. Then one short path, the same for every task: decode and
resize (inline when small, else off the event loop), await the images' places in the model's
adaptive batch (services.runners), map the outputs back to the client's pixels and encode them
as the versioned PredictionResponse with an X-Model-Version header; what differs per task is its
entry in services/endpoints.py. POST /explain answers Grad-CAM heatmaps of the served classify and
detect models (services/explain.py). GET /version is a small FastAPI route mounted beside the apis.
BentoML supplies the lifecycle, the model store, /livez /readyz /metrics, the timeout (504) and
the Bento; services.guard.RequestGuard stands in front of every route (body cap, pickles, the
concurrency cap of the prediction routes and /explain: 503 + Retry-After, JSON 404/405), and BentoML's
request series label unknown paths as one `unmatched` endpoint (services.batching.bound_endpoint_labels).
`targets` are decoded only by the api that scores them (/reconstruct), off the event loop when large;
any other api answers a request carrying them with a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import pipelines.runtime  # noqa: F401  (telemetry off before bentoml is imported)

import anyio
import bentoml
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.params import ServeParams, load_params
from services import batching, budget, catalog, endpoints, explain, imaging
from services import observability as obs
from services.budget import Claim, PixelBudget
from services.endpoints import ROUTES, endpoint
from services.errors import InputError, Overloaded
from services.guard import RequestGuard, endpoint_label
from services.payloads import TARGETS, PredictionRequest, decode_targets
from services.runners import TaskRunner, load_runner
from services.schemas import SCHEMA_VERSION, ImageResult, Options, PredictionResponse

logger = logging.getLogger("convforge.service")
PARAMS_ENV = "CONVFORGE_PARAMS"
WARMUP_QUEUE_CALLS = 16  # trains the dispatcher's latency model on real timings before the first client
INLINE_BYTES = 64 * 1024  # uploads up to this size are decoded on the event loop ...
INLINE_DECODED_PIXELS = 256 * 256  # ... when they decode to at most this many pixels (a 50 KB PNG can hold 16 MP)
INLINE_PIXELS = 128 * 128  # outputs up to this many input pixels are encoded on the event loop


def serve_params() -> ServeParams:
    """params.yaml's `serve` section (CONVFORGE_PARAMS points elsewhere; a Bento carries its own copy)."""
    default = Path(__file__).resolve().parents[1] / "params.yaml"
    return load_params(os.environ.get(PARAMS_ENV, default)).serve


PARAMS = serve_params()
EXPLAIN_ROUTE = "/explain"  # Grad-CAM of the classify and detect models (services/explain.py)
# What the guard admits under the concurrency cap and counts, route -> the `task` label of convforge_requests
GUARDED = {**ROUTES, EXPLAIN_ROUTE: "explain"}
REQUEST = PredictionRequest.limited_to(PARAMS.max_images)  # every api's input (targets: raw files, undecoded)
batching.bound_endpoint_labels(endpoint_label)  # before BentoML builds the app: bounded `endpoint` labels

# GET /version (BentoML's apis are POST); its route joins BentoML's /docs.json, so no docs of its own.
lineage = FastAPI(title="ConvForge", version=SCHEMA_VERSION, docs_url=None, redoc_url=None, openapi_url=None)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@lineage.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


def task_api(task: str, route: str) -> Any:
    """The BentoML api of `task` at `route`, named `task`: PredictionRequest in, PredictionResponse out, one
    delegate to `ConvForge._predict`."""

    async def api(self: ConvForge, images: list[bytes], received: float = 0.0, error: InputError | None = None,
                  **options: Any) -> JSONResponse:
        return await self._predict(task, images, options, received, error)

    api.__name__ = api.__qualname__ = task  # bentoml 1.4 names an api after its function
    api.__doc__ = endpoint(task).doc
    return bentoml.api(route=route, name=task, input_spec=REQUEST, output_spec=PredictionResponse)(api)


def with_task_apis(cls: type) -> type:
    """`cls` with one prediction api per task (services.endpoints.ROUTES), before @bentoml.service collects them."""
    for route, task in ROUTES.items():
        if hasattr(cls, task):
            raise TypeError(f"task {task!r} would replace {cls.__name__}.{task}: rename one of them")
        setattr(cls, task, task_api(task, route))
    return cls


class Pixels(NamedTuple):
    """What a request's uploads decode to, read from their headers: each image's pixels, and its targets' in all."""

    images: list[int]
    targets: int


@bentoml.service(
    name="convforge",
    workers=PARAMS.workers,
    # The concurrency cap is the guard's (503 + Retry-After: the server is busy, not the client wrong);
    # BentoML's own cap would answer 429 from outside the guard.
    traffic={"timeout": PARAMS.timeout_s},
    # No tracing spans and no access-log line per prediction: 0.3 ms of CPU per request (bench/serve.py).
    tracing={"excluded_urls": list(ROUTES)},
    logging={"access": {"enabled": False}},
    http={"host": os.environ.get("CONVFORGE_HOST", PARAMS.host),
          "port": int(os.environ.get("CONVFORGE_PORT", PARAMS.port))},
)
@bentoml.asgi_app(lineage, path="/")
@with_task_apis
class ConvForge:
    """Serves the packaged classify, detect and segment models."""

    def __init__(self) -> None:
        from pipelines.runtime import set_threads
        from services.backends import serve_device

        self.params = PARAMS
        self.device = serve_device(PARAMS.device)  # cpu | cuda
        # One intra-op thread by default: on a small machine the other cores decode, and more threads
        # than free cores make OpenMP spin (BENCHMARKS.md).
        self.threads = set_threads(PARAMS.num_threads)
        self.limits = imaging.DecodeLimits(PARAMS.max_pixels, tuple(PARAMS.formats))
        # Decoded pixels held for the requests in flight (services/budget.py): memory bounded by construction.
        self.pixels = PixelBudget(PARAMS.max_pixels_in_flight)
        budget.return_freed_memory()  # and the pixels given back leave the process
        self.runners: dict[str, TaskRunner] = {}
        for source in catalog.sources():
            self.runners[source.task] = load_runner(
                source.task, source.directory, name=source.name, version=source.version,
                backend=PARAMS.backend, max_batch_size=PARAMS.max_batch_size,
                max_latency_ms=PARAMS.max_latency_ms, lineage=source.lineage,
                expected_sha256=source.expected_sha256, num_threads=self.threads, scale=PARAMS.scale,
                max_side=PARAMS.max_side, device=self.device)
            logger.info("loaded %s model %s (%s on %s)", source.task, source.version,
                        self.runners[source.task].card.backend, self.runners[source.task].device)
        if not self.runners:
            raise RuntimeError("no models to serve: run `python -m pipelines.stages.package` (or set "
                               f"{catalog.MODELS_DIR_ENV}=artifacts/models)")
        self.ready = False

    @bentoml.on_startup
    async def start_warm_up(self) -> None:
        """Warm up in the background, so /livez answers while /readyz still says 503."""
        self._warm_up_task = asyncio.get_running_loop().create_task(self._warm_up())

    async def _warm_up(self) -> None:
        """Each model at batch 1 and at the largest batch, then through its queue so the batching
        dispatcher has measured real latencies before the first client arrives."""
        try:
            for task, runner in self.runners.items():
                start = time.perf_counter()
                await anyio.to_thread.run_sync(runner.warm_up)
                blank = np.zeros((runner.image_size, runner.image_size, runner.in_channels), np.uint8)
                for _ in range(WARMUP_QUEUE_CALLS):
                    await runner.predict(blank)
                # Shedding here only means the box is busy; the model itself has run.
                await asyncio.gather(*(runner.predict(blank) for _ in range(runner.max_batch_size)),
                                     return_exceptions=True)
                obs.WARMUP_SECONDS.labels(task, runner.card.version).set(time.perf_counter() - start)
        except Exception:  # noqa: BLE001 - stay not-ready and say why; /livez still answers
            logger.exception("warm-up failed: the service stays not ready")
            return
        # Everything loaded so far lives as long as the server: out of the collector's sight, so its full
        # collections stop pausing the server under load (p99 at 64 clients 1.1 s -> 0.3 s, bench/serve.py).
        gc.collect()
        gc.freeze()
        self.ready = True
        logger.info("warm-up done: ready")

    def __is_ready__(self) -> bool:
        return self.ready

    @lineage.get("/version", summary="Lineage of every served model")
    async def version(self) -> dict[str, Any]:
        """Git commit, DVC data hash, search trial, MLflow run, registered version and Bento tag per model."""
        server_context = bentoml.server_context
        known = server_context.bento_version not in (None, "", "not available")
        bento = f"{server_context.bento_name}:{server_context.bento_version}" if known else None
        return {"schema_version": SCHEMA_VERSION, "bento": bento, "device": self.device, "models": {
            task: {"name": r.card.name, "version": r.card.version, "tag": r.card.tag, "family": r.card.family,
                   "backend": r.card.backend, "device": r.device, "classes": r.classes, "image_size": r.image_size,
                   **r.card.lineage}
            for task, r in self.runners.items()}}

    @bentoml.api(route=EXPLAIN_ROUTE, name="explain", input_spec=REQUEST, output_spec=PredictionResponse)
    async def explain(self, images: list[bytes], received: float = 0.0, error: InputError | None = None,
                      **options: Any) -> JSONResponse:
        """Grad-CAM heatmaps of the `task` model (classify: the top class or `class_name`/`class_index`;
        detect: each detection /detect returns), as base64 PNG at the image's size and a low-res array."""
        try:
            task = explain.explained_task(options)
        except InputError as exc:
            return _error(exc.status, str(exc))
        opened = self._open(task, options, received, error, EXPLAIN_ROUTE)
        if isinstance(opened, JSONResponse):
            return opened
        runner, headers, chosen, received = opened
        claim = self.pixels.claim()
        try:
            class_index = explain.chosen_class(runner, options)
            prepared = await _in_thread(claim, self._prepare, runner, images, claim, EXPLAIN_ROUTE)
            results = [await _in_thread(claim, explain.explain_image, runner, index, item, chosen, class_index)
                       for index, item in enumerate(prepared)]
        except (InputError, Overloaded) as exc:  # 4xx, or 503 (the guard adds its Retry-After)
            return _error(exc.status, str(exc), headers)
        finally:
            claim.release()
        body = endpoints.response(task, runner.card, chosen, results)
        answer = JSONResponse(body.model_dump(mode="json", exclude_none=True), headers=headers)
        obs.EXPLAIN_SECONDS.labels(task, runner.card.version).observe(time.perf_counter() - received)
        return answer

    def _open(self, task: str, options: dict[str, Any], received: float, error: InputError | None,
              route: str | None = None) -> tuple[TaskRunner, dict[str, str], Options, float] | JSONResponse:
        """What every api does first: the task's runner (404 when none is served), its headers, a request
        that did not parse answered with its 4xx, `targets` sent to an api that does not score them (`route`,
        default `/<task>`) answered 400, the options with the model's defaults (an option the model cannot honour
        answered 400), and the start time (0.0 when called in-process, not read from HTTP)."""
        runner = self.runners.get(task)
        if runner is None:
            return _error(404, f"no {task} model is served (package one with `python -m pipelines.stages.package`)")
        headers = {"X-Model-Version": runner.card.tag}
        if error is not None:
            return _error(error.status, str(error), headers)
        try:
            endpoints.check_targets(route or f"/{task}", task, options)
            chosen = runner.options(options, self.params.top_k)
        except InputError as exc:
            return _error(exc.status, str(exc), headers)
        return runner, headers, chosen, received or time.perf_counter()

    async def _predict(self, task: str, blobs: list[bytes], options: dict[str, Any], received: float,
                       error: InputError | None) -> JSONResponse:
        """One prediction request of any task, as read by PredictionRequest: prepare, batch, map back and encode."""
        opened = self._open(task, options, received, error)
        if isinstance(opened, JSONResponse):
            return opened
        runner, headers, chosen, received = opened
        labels = (task, f"/{task}", runner.card.version)
        claim = self.pixels.claim()
        try:
            # Small uploads decode faster inline than a hop to a worker thread: keep them on the loop.
            pixels = self._inline_pixels(runner, blobs, chosen)
            if pixels is not None:
                prepared, chosen = self._load(runner, blobs, chosen, claim, pixels)
            else:
                prepared, chosen = await _in_thread(claim, self._load, runner, blobs, chosen, claim)
            obs.PREPROCESS_SECONDS.labels(*labels).observe(time.perf_counter() - received)
            outputs = await asyncio.gather(*(runner.predict(item.array, claim) for item in prepared))
            for out in outputs:
                obs.QUEUE_SECONDS.labels(*labels).observe(out.queue_s)
                obs.INFERENCE_SECONDS.labels(*labels).observe(out.inference_s)
            start = time.perf_counter()
            response = await self._respond(runner, [out.value for out in outputs], prepared, chosen, headers, claim)
            obs.POSTPROCESS_SECONDS.labels(*labels).observe(time.perf_counter() - start)
            return response
        except (InputError, Overloaded) as exc:  # 4xx, or 503 (the guard adds its Retry-After)
            return _error(exc.status, str(exc), headers)
        finally:
            claim.release()

    async def _respond(self, runner: TaskRunner, values: list[Any], prepared: list[imaging.Prepared],
                       options: Options, headers: dict[str, str], claim: Claim) -> JSONResponse:
        """The JSON response: results mapped back and encoded (inline when small, else in a thread)."""
        if sum(p.placement.width * p.placement.height for p in prepared) <= INLINE_PIXELS:
            results = self._results(runner, values, prepared, options)
        else:
            results = await _in_thread(claim, self._results, runner, values, prepared, options)
        body = endpoints.response(runner.task, runner.card, options, results)
        return JSONResponse(body.model_dump(mode="json", exclude_none=True), headers=headers)

    def _inline_pixels(self, runner: TaskRunner, blobs: list[bytes], options: Options) -> Pixels | None:
        """What the uploads and targets decode to (read from their headers) when they are small enough to decode on
        the event loop, in bytes and in those pixels; None when they are not (the headers are then read in the
        worker thread)."""
        targets = options.targets or []
        if sum(map(len, [*blobs, *targets])) > INLINE_BYTES:
            return None
        pixels = Pixels([imaging.decoded_pixels(blob, self.limits, runner.fit) for blob in blobs],
                        sum(imaging.decoded_pixels(blob, self.limits) for blob in targets))
        return pixels if sum(pixels.images) + pixels.targets <= INLINE_DECODED_PIXELS else None

    def _load(self, runner: TaskRunner, blobs: list[bytes], options: Options, claim: Claim,
              pixels: Pixels | None = None) -> tuple[list[imaging.Prepared], Options]:
        """The prepared images (`_prepare`) and the options with their `targets` decoded under the same limits,
        held on `claim` until the answer (only the apis that score targets get here with any: `_open`); `pixels`
        where the caller read the headers already."""
        prepared = self._prepare(runner, blobs, claim, sizes=pixels.images if pixels else None)
        if not options.targets:
            return prepared, options
        claim.hold(pixels.targets if pixels else sum(imaging.decoded_pixels(blob, self.limits)
                                                     for blob in options.targets))
        return prepared, options.model_copy(update={TARGETS: decode_targets(options.targets, self.limits)})

    def _prepare(self, runner: TaskRunner, blobs: list[bytes], claim: Claim, route: str | None = None,
                 sizes: list[int] | None = None) -> list[imaging.Prepared]:
        """Decode each image and fit it to the model input (services.imaging.prepare, the runner's fit), its
        pixels (`sizes` where the caller read them from the headers already) held on `claim` while it decodes and
        its input's until the answer; `route`: the endpoint whose metrics see it (the task's own by default)."""
        route = route or f"/{runner.task}"
        sizes = sizes or [imaging.decoded_pixels(blob, self.limits, runner.fit) for blob in blobs]
        prepared = []
        for index, (blob, size) in enumerate(zip(blobs, sizes)):
            try:
                with claim.holding(size):
                    item = imaging.prepare(blob, self.limits, runner.fit, runner.in_channels)
            except InputError as exc:
                raise InputError(exc.status, f"images[{index}]: {exc}") from None
            claim.hold(item.array.shape[0] * item.array.shape[1])
            obs.IMAGE_PIXELS.labels(runner.task, route, runner.card.version).observe(
                item.placement.width * item.placement.height)
            prepared.append(item)
        return prepared

    def _results(self, runner: TaskRunner, values: list[Any], prepared: list[imaging.Prepared],
                 options: Options) -> list[ImageResult]:
        """Each image's result in its own pixels, with its training-domain check, observed in the metrics."""
        served, task, version = endpoint(runner.task), runner.task, runner.card.version
        results = []
        for index, (value, item) in enumerate(zip(values, prepared)):
            result, broken = endpoints.checked_result(task, index, value, runner.classes, options, item.placement,
                                                      runner.domain, item.facts)
            for kind, _ in broken:
                obs.OUT_OF_DOMAIN.labels(task, version, kind).inc()
            served.observe(result, task, version)
            results.append(result)
        return results


async def _in_thread(claim: Claim, function: Any, *args: Any) -> Any:
    """`function(*args)` in a worker thread. When the request is cancelled (BentoML's 504) it waits for the thread,
    which stops at its next claim on pixels (services.budget.RequestGone), so that the claim is given back once
    the pixels are freed, not while a thread still decodes them."""
    thread = asyncio.ensure_future(anyio.to_thread.run_sync(function, *args))
    try:
        return await asyncio.shield(thread)
    except asyncio.CancelledError:
        claim.cancel()
        with contextlib.suppress(Exception):  # nobody waits for its answer any more
            await thread
        raise


ConvForge.add_asgi_middleware(RequestGuard, max_body_bytes=PARAMS.max_body_bytes, routes=GUARDED,
                              max_concurrency=-(-PARAMS.max_concurrency // PARAMS.workers))  # per worker
