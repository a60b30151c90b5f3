"""The request guard (services/guard.py) and request reading (services/payloads.py) on a real Starlette app."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.endpoints import ROUTES
from services.errors import InputError
from services.guard import RequestGuard
from services.payloads import read_request


async def echo(request: Request) -> Response:
    try:
        blobs, options = await read_request(request, max_images=2)
    except InputError as exc:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)
    return JSONResponse({"sizes": [len(b) for b in blobs], "top_k": options.top_k,
                         "box_format": options.box_format}, headers={"X-Model-Version": "m:1"})


async def busy(_: Request) -> Response:
    return JSONResponse({"error": "busy"}, status_code=503)


class Client:
    """Synchronous calls into the guarded ASGI app through httpx's in-process ASGI transport."""

    def __init__(self, cap: int) -> None:
        app = Starlette(routes=[Route("/classify", echo, methods=["POST"]), Route("/busy", busy, methods=["GET"])])
        self.app = RequestGuard(app, max_body_bytes=cap, routes={"/classify": "classify"})

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://guard") as client:
                return await client.request(method, path, **kwargs)

        return asyncio.run(call())

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.request("GET", path, **kwargs)


def client(cap: int = 100) -> Client:
    return Client(cap)


def test_body_cap_with_and_without_content_length():
    c = client(cap=100)
    assert c.post("/classify", content=b"x" * 101, headers={"Content-Type": "application/json"}).status_code == 413

    async def chunks():  # chunked: no Content-Length, counted while streaming
        for _ in range(5):
            yield b"x" * 30

    reply = c.post("/classify", content=chunks(), headers={"Content-Type": "application/json"})
    assert reply.status_code == 413 and "100 bytes" in reply.json()["error"]


def test_pickle_media_type_is_415_anywhere():
    c = client()
    for path in ("/classify", "/busy", "/missing"):
        reply = c.post(path, content=b"\x80\x04.", headers={"Content-Type": "application/vnd.bentoml+pickle; x=1"})
        assert reply.status_code == 415


def test_retry_after_is_added_to_503():
    assert client().get("/busy").headers["retry-after"] == "1"


def test_json_and_multipart_are_read_the_same():
    c = client(cap=10_000)
    text = base64.b64encode(b"abc").decode()
    as_json = c.post("/classify", json={"images": [text, "data:image/png;base64," + text], "top_k": 2})
    assert as_json.json() == {"sizes": [3, 3], "top_k": 2, "box_format": "xyxy"}
    as_form = c.post("/classify", files=[("images", ("a", b"abc")), ("images", ("b", b"abcd"))],
                     data={"top_k": "2", "box_format": "xywh"})
    assert as_form.json() == {"sizes": [3, 4], "top_k": 2, "box_format": "xywh"}
    # BentoML's HTTP clients send each option json.dumps'd, None as null (its default)
    from_client = c.post("/classify", files=[("images", ("a", b"abc"))],
                         data={"top_k": "2", "box_format": '"xywh"', "score_threshold": "null"})
    assert from_client.json() == {"sizes": [3], "top_k": 2, "box_format": "xywh"}


def test_outcomes_are_counted_with_the_bare_model_version():
    from prometheus_client import REGISTRY

    labels = {"task": "classify", "endpoint": "/classify", "model_version": "1", "status_class": "2xx"}
    before = REGISTRY.get_sample_value("convforge_requests_total", labels) or 0.0
    reply = client(cap=10_000).post("/classify", json={"images": ["YQ=="]})
    assert reply.headers["X-Model-Version"] == "m:1"  # the header keeps name:version
    assert REGISTRY.get_sample_value("convforge_requests_total", labels) == before + 1


def test_request_problems_are_one_line_4xx():
    c = client(cap=10_000)
    cases = [
        (dict(json={"images": ["YQ==", "YQ==", "YQ=="]}), 413, "limit is 2"),
        (dict(json={"images": []}), 422, "images"),
        (dict(json={"image": "YQ==", "images": ["YQ=="]}), 422, "not both"),
        (dict(json={"images": ["YQ=="], "colour": 1}), 422, "unknown field 'colour'"),
        (dict(json={"images": ["YQ=="], "top_k": 0}), 422, "top_k"),
        (dict(files=[("images", ("a", b"x"))], data={"top_k": "lots"}), 422, "top_k"),
        (dict(files=[("images", ("a", b"x"))], data={"top_k": "true"}), 422, "top_k"),
        (dict(files=[("images", ("a", b"x"))], data={"box_format": '"yxyx"'}), 422, "box_format"),
        (dict(files=[("photo", ("a", b"x"))]), 422, "unknown field 'photo'"),
        (dict(files=[("images", (None, "text, not a file"))]), 422, "file upload"),
        (dict(data={"images": "http://127.0.0.1:1/x.png"}), 422, "file upload"),  # urlencoded
        (dict(content=b"--nope\r\n", headers={"Content-Type": "multipart/form-data; boundary=zz"}), 400, "malformed"),
        (dict(content=b"--zz--\r\n", headers={"Content-Type": "multipart/form-data; boundary=zz"}), 422, "no images"),
        (dict(content=b"{", headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
        (dict(content=b"", headers={"Content-Type": "application/json"}), 400, "empty request body"),
        (dict(content=b"hi", headers={"Content-Type": "image/png"}), 415, "unsupported content type"),
    ]
    for kwargs, status, words in cases:
        reply = c.post("/classify", **kwargs)
        assert reply.status_code == status, (kwargs, reply.text)
        assert words in reply.json()["error"] and "\n" not in reply.json()["error"]


def test_over_the_concurrency_cap_is_503_with_retry_after_and_the_slot_comes_back():
    """Predictions past `max_concurrency` in flight get 503 + Retry-After; an answered one frees its slot."""
    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    guard = RequestGuard(slow_app, max_body_bytes=1024, routes={"/p": "t"}, max_concurrency=1)

    async def call() -> tuple[int, dict]:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/p", "headers": [(b"content-type", b"application/json")]}
        await guard(scope, receive, send)
        start = sent[0]
        return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}

    async def scenario():
        first = asyncio.create_task(call())
        await asyncio.sleep(0.01)
        assert guard.in_flight == 1
        status, headers = await call()
        assert status == 503 and headers["retry-after"] == "1"
        release.set()
        assert (await first)[0] == 200 and guard.in_flight == 0
        assert (await call())[0] == 200

    asyncio.run(scenario())


def raw_call(guard: RequestGuard, path: str, messages: list[dict], query: bytes = b"") -> list[dict]:
    """Drive `guard` with the client's `messages` for a POST to `path`; returns what it sent back."""
    sent = []

    async def main() -> None:
        pending = list(messages)

        async def receive():
            return pending.pop(0) if pending else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": path, "query_string": query,
                 "headers": [(b"content-type", b"application/json")]}
        await guard(scope, receive, send)

    asyncio.run(main())
    return sent


def outcomes(task: str) -> float:
    """convforge_requests_total of `task` over every status class and version."""
    from prometheus_client import REGISTRY

    return sum(sample.value for family in REGISTRY.collect() if family.name == "convforge_requests"
               for sample in family.samples if sample.name.endswith("_total") and sample.labels["task"] == task)


def test_a_client_that_disconnects_mid_body_never_reaches_the_app_and_is_not_counted():
    """A cancelled upload: the app is never called with the half body, nothing is answered or counted (the old
    guard passed the partial body on, which was parsed and counted as a client 4xx)."""
    called = []

    async def app(scope, receive, send):
        called.append(await receive())
        response = JSONResponse({"error": "half a body"}, status_code=422)
        await response(scope, receive, send)

    guard = RequestGuard(app, max_body_bytes=1024, routes={"/gone": "gone"})
    before = outcomes("gone")
    sent = raw_call(guard, "/gone", [{"type": "http.request", "body": b'{"images": ["YQ', "more_body": True},
                                     {"type": "http.disconnect"}])
    assert called == [] and sent == [] and outcomes("gone") == before and guard.in_flight == 0


def test_a_query_string_on_a_prediction_route_is_400_and_elsewhere_untouched():
    c = client(cap=10_000)
    reply = c.post("/classify?score_threshold=0.99", json={"images": ["YQ=="]})
    assert reply.status_code == 400, reply.text
    assert reply.json() == {"error": "options go in the request body, not the query string"}
    assert c.post("/classify", json={"images": ["YQ=="]}).status_code == 200
    assert c.get("/busy?verbose=1").status_code == 503  # not a prediction route: no rule about its query


def test_the_routers_404_and_405_are_one_line_json():
    c = client()
    for path in ("/missing", "/CLASSIFY", "/classify/x", "/%E2%98%83"):
        reply = c.get(path)
        assert reply.status_code == 404 and reply.headers["content-type"] == "application/json", reply.text
        assert reply.json() == {"error": "no such route; GET /docs.json lists the routes"}
    wrong = c.get("/classify")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json() == {"error": "method GET is not allowed here; allowed: POST"}
    app_answer = c.post("/classify", json={"images": []})  # the app's own JSON 4xx is left as it is
    assert app_answer.status_code == 422 and app_answer.json()["error"].startswith("images")


def test_a_prediction_cancelled_before_it_answered_counts_as_the_504_bentomls_timeout_sends():
    """BentoML's timeout answers 504 from outside the guard after cancelling the guard's call: counted here."""
    async def stuck(scope, receive, send):
        await asyncio.sleep(60)

    guard = RequestGuard(stuck, max_body_bytes=1024, routes={"/slow": "slow"})

    async def main() -> None:
        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            raise AssertionError(f"the guard answered {message}")

        scope = {"type": "http", "method": "POST", "path": "/slow", "query_string": b"", "headers": []}
        call = asyncio.ensure_future(guard(scope, receive, send))
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    from prometheus_client import REGISTRY

    labels = {"task": "slow", "endpoint": "/slow", "model_version": "none", "status_class": "5xx"}
    before = REGISTRY.get_sample_value("convforge_requests_total", labels) or 0.0
    asyncio.run(main())
    assert REGISTRY.get_sample_value("convforge_requests_total", labels) == before + 1 and guard.in_flight == 0


def test_the_service_guards_and_counts_explain_under_the_same_cap():
    """POST /explain is admitted under the concurrency cap and counted like the prediction routes."""
    from services.service import EXPLAIN_ROUTE, ConvForge

    (options,) = [options for cls, options in ConvForge.middlewares if cls is RequestGuard]
    assert options["routes"][EXPLAIN_ROUTE] == "explain"
    assert {route for route, task in options["routes"].items() if task != "explain"} == set(ROUTES)

    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await release.wait()
        await JSONResponse({}, headers={"X-Model-Version": "m:7"})(scope, receive, send)

    guard = RequestGuard(slow_app, max_body_bytes=1024, routes=options["routes"], max_concurrency=2)
    before = outcomes("explain")

    async def scenario() -> list[int]:
        async def call() -> int:
            sent = []

            async def receive():
                return {"type": "http.request", "body": b"{}", "more_body": False}

            async def send(message):
                sent.append(message)

            await guard({"type": "http", "method": "POST", "path": EXPLAIN_ROUTE, "query_string": b"",
                         "headers": []}, receive, send)
            return sent[0]["status"]

        calls = [asyncio.ensure_future(call()) for _ in range(6)]
        await asyncio.sleep(0.05)
        release.set()
        return sorted(await asyncio.gather(*calls))

    assert asyncio.run(scenario()) == [200, 200, 503, 503, 503, 503]
    assert outcomes("explain") == before + 6


def test_too_many_files_says_targets():
    c = client(cap=100_000)
    reply = c.post("/classify", files=[("images", ("a", b"x")), *[("targets", (f"t{i}", b"x")) for i in range(6)]])
    assert reply.status_code == 413 and "targets" in reply.json()["error"], reply.text
