"""The ConvForge BentoML service: POST /classify, /detect, /segment, GET /version.

The service class loads each task's model once in `__init__` (BentoML model store, or
CONVFORGE_MODELS_DIR in development), warms every model up in the background, and only
then answers /readyz. Each endpoint is one short method: read the request, decode and
resize off the event loop, await the images' places in the model's adaptive batch
(services.runners), map the outputs back to the client's pixels and encode them. What differs
per task (geometry, result, metrics) is its endpoint in services/endpoints.py.
Endpoints are FastAPI routes mounted on the BentoML service, because they take both
multipart uploads and base64 JSON with our own hardened decoding; BentoML supplies the
lifecycle, the model store, /livez /readyz /metrics, the timeout (504) and the
concurrency cap (429), and the Bento.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import pipelines.runtime  # noqa: F401  (telemetry off before bentoml is imported)

import anyio
import bentoml
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.params import ServeParams, load_params
from pipelines.tasks import ClassifyTask, DetectTask, SegmentTask
from services import catalog, imaging
from services import observability as obs
from services.endpoints import ROUTES, endpoint
from services.errors import InputError, Overloaded
from services.guard import RequestGuard
from services.payloads import read_request
from services.runners import TaskRunner, load_runner
from services.schemas import SCHEMA_VERSION, ErrorResponse, ImageResult, JsonRequest, Options, PredictionResponse

logger = logging.getLogger("convforge.service")
PARAMS_ENV = "CONVFORGE_PARAMS"
WARMUP_QUEUE_CALLS = 16  # trains the dispatcher's latency model on real timings before the first client
INLINE_BYTES = 64 * 1024  # uploads up to this size are decoded on the event loop
INLINE_PIXELS = 128 * 128  # outputs up to this many input pixels are encoded on the event loop


def serve_params() -> ServeParams:
    """params.yaml's `serve` section (CONVFORGE_PARAMS points elsewhere; a Bento carries its own copy)."""
    default = Path(__file__).resolve().parents[1] / "params.yaml"
    return load_params(os.environ.get(PARAMS_ENV, default)).serve


PARAMS = serve_params()

app = FastAPI(
    title="ConvForge",
    version=SCHEMA_VERSION,
    description="Image classification, object detection and semantic segmentation with CNNs trained by "
                "ConvForge. Send images as multipart uploads (field `images`) or JSON with base64 strings.",
)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@app.exception_handler(InputError)
async def _input_error(_: Request, exc: InputError) -> JSONResponse:
    return _error(exc.status, str(exc))


@app.exception_handler(Overloaded)
async def _overloaded(_: Request, exc: Overloaded) -> JSONResponse:
    return _error(503, str(exc), {"Retry-After": "1"})


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    return _error(422, f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}")


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


def _request_body_doc() -> dict[str, Any]:
    """OpenAPI requestBody for JSON (base64) and multipart, with examples (1x1 PNG)."""
    pixel = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="
    options = Options.model_json_schema()
    multipart = {"type": "object", "required": ["images"], "additionalProperties": False,
                 "properties": {"images": {"type": "array", "minItems": 1,
                                           "items": {"type": "string", "format": "binary"}},
                                **options["properties"]}}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": JsonRequest.model_json_schema(ref_template="#/components/schemas/{model}"),
                             "example": {"images": [pixel], "top_k": 3, "box_format": "xyxy",
                                         "mask_format": "png"}},
        "multipart/form-data": {"schema": multipart},
    }}}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in {
        400: "unreadable image or body", 413: "body, image or image count over the limit",
        415: "unsupported content type", 422: "wrong field name or type", 429: "over the concurrency cap",
        404: "no model of this task is served", 503: "shedding load (Retry-After)",
        504: "over the request timeout"}.items()}


def _prediction_route() -> dict[str, Any]:
    """What every prediction route declares in OpenAPI: its response, its errors and its request body."""
    return {"response_model": PredictionResponse, "responses": ERROR_RESPONSES, "openapi_extra": _request_body_doc()}


@bentoml.service(
    name="convforge",
    workers=PARAMS.workers,
    traffic={"timeout": PARAMS.timeout_s, "max_concurrency": PARAMS.max_concurrency},
    http={"host": os.environ.get("CONVFORGE_HOST", PARAMS.host),
          "port": int(os.environ.get("CONVFORGE_PORT", PARAMS.port))},
)
@bentoml.asgi_app(app, path="/")
class ConvForge:
    """Serves the packaged classify, detect and segment models."""

    def __init__(self) -> None:
        from pipelines.runtime import set_threads

        self.params = PARAMS
        # One intra-op thread by default: on a small machine the other cores decode, and more threads
        # than free cores make OpenMP spin (BENCHMARKS.md).
        self.threads = set_threads(PARAMS.num_threads)
        self.limits = imaging.DecodeLimits(PARAMS.max_pixels, tuple(PARAMS.formats))
        self.runners: dict[str, TaskRunner] = {}
        for source in catalog.sources():
            self.runners[source.task] = load_runner(
                source.task, source.directory, name=source.name, version=source.version,
                backend=PARAMS.backend, max_batch_size=PARAMS.max_batch_size,
                max_latency_ms=PARAMS.max_latency_ms, lineage=source.lineage,
                expected_sha256=source.expected_sha256, num_threads=self.threads, scale=PARAMS.scale,
                max_side=PARAMS.max_side)
            logger.info("loaded %s model %s (%s)", source.task, source.version, self.runners[source.task].card.backend)
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
        self.ready = True
        logger.info("warm-up done: ready")

    def __is_ready__(self) -> bool:
        return self.ready

    @app.get("/version", summary="Lineage of every served model")
    async def version(self) -> dict[str, Any]:
        """Git commit, DVC data hash, search trial, MLflow run, registered version and Bento tag per model."""
        server_context = bentoml.server_context
        known = server_context.bento_version not in (None, "", "not available")
        bento = f"{server_context.bento_name}:{server_context.bento_version}" if known else None
        return {"schema_version": SCHEMA_VERSION, "bento": bento, "models": {
            task: {"name": r.card.name, "version": r.card.version, "tag": r.card.tag, "family": r.card.family,
                   "backend": r.card.backend, "classes": r.classes, "image_size": r.image_size, **r.card.lineage}
            for task, r in self.runners.items()}}

    @app.post(f"/{ClassifyTask.name}", summary="Top-k labels with probabilities for one or many images",
              **_prediction_route())
    async def classify(self, request: Request) -> JSONResponse:
        """Each image resized as in training; `top_k` labels per image, highest probability first."""
        return await self._predict(ClassifyTask.name, request)

    @app.post(f"/{DetectTask.name}", summary="Boxes, labels and scores in the input's own pixels",
              **_prediction_route())
    async def detect(self, request: Request) -> JSONResponse:
        """Letterboxed as in training (serve.scale native: at its own pixels up to serve.max_side); boxes mapped
        back in `box_format`; `score_threshold`, `max_detections`."""
        return await self._predict(DetectTask.name, request)

    @app.post(f"/{SegmentTask.name}", summary="Class mask at the input's size and pixels per class",
              **_prediction_route())
    async def segment(self, request: Request) -> JSONResponse:
        """Class mask (PNG base64, pixel = class + 1; or per-class RLE/polygons) and per-class pixel counts."""
        return await self._predict(SegmentTask.name, request)

    async def _predict(self, task: str, request: Request) -> JSONResponse:
        """One prediction request of any task: read, prepare, batch, map back and encode."""
        runner = self.runners.get(task)
        if runner is None:
            return _error(404, f"no {task} model is served (package one with `python -m pipelines.stages.package`)")
        headers = {"X-Model-Version": runner.card.tag}
        labels = (task, f"/{task}", runner.card.version)
        try:
            start = time.perf_counter()
            blobs, options = await read_request(request, self.params.max_images)
            options = options.model_copy(update={"top_k": options.top_k or self.params.top_k})
            # Small uploads decode faster inline than a hop to a worker thread: keep them on the loop.
            if sum(map(len, blobs)) <= INLINE_BYTES:
                prepared = self._prepare(runner, blobs)
            else:
                prepared = await anyio.to_thread.run_sync(self._prepare, runner, blobs)
            obs.PREPROCESS_SECONDS.labels(*labels).observe(time.perf_counter() - start)
            outputs = await asyncio.gather(*(runner.predict(item.array) for item in prepared))
            for out in outputs:
                obs.QUEUE_SECONDS.labels(*labels).observe(out.queue_s)
                obs.INFERENCE_SECONDS.labels(*labels).observe(out.inference_s)
            start = time.perf_counter()
            response = await self._respond(runner, [out.value for out in outputs], prepared, options, headers)
            obs.POSTPROCESS_SECONDS.labels(*labels).observe(time.perf_counter() - start)
            return response
        except InputError as exc:
            return _error(exc.status, str(exc), headers)
        except Overloaded as exc:
            return _error(503, str(exc), {**headers, "Retry-After": "1"})

    async def _respond(self, runner: TaskRunner, values: list[Any], prepared: list[imaging.Prepared],
                       options: Options, headers: dict[str, str]) -> JSONResponse:
        """The JSON response: results mapped back and encoded (inline when small, else in a thread)."""
        if sum(p.placement.width * p.placement.height for p in prepared) <= INLINE_PIXELS:
            results = self._results(runner, values, prepared, options)
        else:
            results = await anyio.to_thread.run_sync(self._results, runner, values, prepared, options)
        task, card = runner.task, runner.card
        body = PredictionResponse(
            task=task, model={"task": task, "family": card.family, "name": card.name, "version": card.version},
            **{key: getattr(options, key) for key in endpoint(task).echoes}, results=results)
        return JSONResponse(body.model_dump(mode="json", exclude_none=True), headers=headers)

    def _prepare(self, runner: TaskRunner, blobs: list[bytes]) -> list[imaging.Prepared]:
        """Decode each image and fit it to the model input (services.imaging.prepare, the runner's fit)."""
        prepared = []
        for index, blob in enumerate(blobs):
            try:
                item = imaging.prepare(blob, self.limits, runner.fit, runner.in_channels)
            except InputError as exc:
                raise InputError(exc.status, f"images[{index}]: {exc}") from None
            obs.IMAGE_PIXELS.labels(runner.task, f"/{runner.task}", runner.card.version).observe(
                item.placement.width * item.placement.height)
            prepared.append(item)
        return prepared

    def _results(self, runner: TaskRunner, values: list[Any], prepared: list[imaging.Prepared],
                 options: Options) -> list[ImageResult]:
        """Each image's result in its own pixels, with its training-domain check, observed in the metrics."""
        served, task, version = endpoint(runner.task), runner.task, runner.card.version
        results = []
        for index, (value, item) in enumerate(zip(values, prepared)):
            result = served.result(index, value, runner.classes, options, item.placement)
            broken = runner.domain.check(item.facts)
            result.in_domain = not broken
            result.reason = "; ".join(reason for _, reason in broken) or None
            for kind, _ in broken:
                obs.OUT_OF_DOMAIN.labels(task, version, kind).inc()
            served.observe(result, task, version)
            results.append(result)
        return results


ConvForge.add_asgi_middleware(RequestGuard, max_body_bytes=PARAMS.max_body_bytes, routes=ROUTES)
