"""ASGI middleware in front of every route: body cap, no pickles, outcome metrics, Retry-After, JSON 404/405.

BentoML 1.4 sets no request-body limit, and its pickle media type (CVE-2024-2912,
CVE-2025-27520) is refused only on its own API routes: here both hold for every route (the
service adds this guard with BentoML's public `add_asgi_middleware`), and so does the concurrency
cap, as 503 + Retry-After (BentoML's own cap answers 429 without it). Outcomes are counted per
prediction route (and /explain) with the bare model version, read from the `name:version`
X-Model-Version header.

BentoML stacks its middlewares, outermost first, as: traffic metrics, OpenTelemetry, access log,
timeout (504), its concurrency cap, then the user's (this guard), CORS and its context
(_bentoml_impl/server/app.py, ServiceAppFactory.middlewares). Two consequences:
- Its metrics middleware labels every request series with `scope["path"]`, read before the guard
  runs, so the guard cannot bound those labels; `endpoint_label` is what BentoML's series are
  labelled with instead (the matched route, or one `unmatched` value: services/batching.py
  installs it).
- Its timeout answers 504 from outside the guard, after cancelling the guard's call: a prediction
  cancelled before it answered is counted here as that 504.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.routing import Match, Mount

from services import observability as obs

PICKLE_MEDIA_TYPE = "application/vnd.bentoml+pickle"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
UNMATCHED = "unmatched"  # BentoML's `endpoint` label of every path that no route serves
TIMEOUT_STATUS = 504  # what BentoML's timeout answers for a call it cancelled
QUERY_MESSAGE = "options go in the request body, not the query string"


class ClientGone(Exception):
    """The client disconnected before its request body was complete."""


class RequestGuard:
    """413 over `max_body_bytes`, 415 for pickle bodies, 400 for a query string on a prediction route, 503 over
    `max_concurrency` predictions in flight (0: no cap); counts prediction outcomes; Retry-After on 503/429;
    the router's plain-text 404/405 as JSON."""

    def __init__(self, app: Any, max_body_bytes: int, routes: dict[str, str], retry_after_s: int = 1,
                 max_concurrency: int = 0) -> None:
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.routes = dict(routes)  # path -> task label (the prediction routes and /explain)
        self.retry_after = str(int(retry_after_s))
        self.max_concurrency = int(max_concurrency)
        self.in_flight = 0  # prediction requests past the guard and not yet answered (one event loop: no lock)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self._refusal(scope)
        if refused:
            await self._reject(scope, receive, send, *refused)
            return
        if scope["method"] in BODY_METHODS:
            try:
                body = await self._read_body(receive)
            except ClientGone:
                return  # nobody to answer: the app never sees a half body, and no outcome is counted
            if body is None:
                await self._reject(scope, receive, send, 413, self._over_cap())
                return
            receive = _replay(body, receive)
            task = self.routes.get(scope["path"])
            if task:
                obs.REQUEST_BYTES.labels(task, scope["path"]).observe(len(body))
                if scope.get("query_string"):
                    await self._reject(scope, receive, send, 400, QUERY_MESSAGE)
                    return
                await self._admit(scope, receive, send)
                return
        await self.app(scope, receive, self._sending(scope, send))

    def _refusal(self, scope: dict) -> tuple[int, str] | None:
        """(status, message) for a request refused on its headers alone: a pickle body, or one declared over
        the cap."""
        headers = Headers(scope=scope)
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type == PICKLE_MEDIA_TYPE:
            return 415, f"{PICKLE_MEDIA_TYPE} is not accepted"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return 413, self._over_cap()
        return None

    def _over_cap(self) -> str:
        return f"request body over the limit of {self.max_body_bytes} bytes"

    async def _admit(self, scope: dict, receive: Any, send: Any) -> None:
        """A prediction, its body read (the connection stays usable): 503 at the cap, else on to the app. A call
        cancelled before it answered is BentoML's timeout, which answers its 504 outside the guard: counted here."""
        if self.max_concurrency and self.in_flight >= self.max_concurrency:
            await self._reject(scope, receive, send, 503, f"over {self.max_concurrency} requests in flight; "
                                                          "retry after the Retry-After seconds")
            return
        self.in_flight += 1
        answered: list[int] = []
        try:
            await self.app(scope, receive, self._sending(scope, send, answered))
        except asyncio.CancelledError:
            if not answered:
                self._count(scope, TIMEOUT_STATUS, [])
            raise
        finally:
            self.in_flight -= 1

    async def _read_body(self, receive: Any) -> bytes | None:
        """The whole body, or None once it passes the cap (chunked uploads have no Content-Length); ClientGone
        when the client disconnects first."""
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _count(self, scope: dict, status: int, headers: list) -> None:
        """One outcome of a guarded route, with the bare model version of its X-Model-Version header."""
        task = self.routes.get(scope["path"])
        if task:
            tag = dict(headers).get(b"x-model-version", b"none").decode()
            version = tag.rpartition(":")[2]  # the bare version, as every other series spells it
            obs.REQUESTS.labels(task, scope["path"], version, obs.status_class(status)).inc()

    def _sending(self, scope: dict, send: Any, answered: list[int] | None = None) -> Any:
        """`send` that adds Retry-After to 503/429, answers the router's plain-text 404/405 as JSON, counts the
        outcome and notes its status in `answered`."""
        replaced = False

        async def wrapped(message: dict) -> None:
            nonlocal replaced
            if replaced:
                return  # the app's own body of a 404/405 already answered as JSON
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if answered is not None:
                    answered.append(status)
                message = self._with_retry_after(message)
                self._count(scope, status, message.get("headers", []))
                if status in (404, 405) and not _is_json(message):
                    replaced = True
                    await _json_instead(scope, message, send)
                    return
            await send(message)

        return wrapped

    def _with_retry_after(self, message: dict) -> dict:
        """A 429/503 start message with a Retry-After header (added when the app set none)."""
        if int(message["status"]) not in (429, 503):
            return message
        headers = message.get("headers", [])
        if b"retry-after" in {bytes(name).lower() for name, _ in headers}:
            return message
        return {**message, "headers": [*headers, (b"retry-after", self.retry_after.encode())]}

    async def _reject(self, scope: dict, receive: Any, send: Any, status: int, message: str) -> None:
        response = JSONResponse({"error": message}, status_code=status)
        await response(scope, receive, self._sending(scope, send))


def _is_json(start: dict) -> bool:
    media_type = dict(start.get("headers", [])).get(b"content-type", b"").split(b";")[0].strip().lower()
    return media_type == b"application/json" or media_type.endswith(b"+json")


async def _json_instead(scope: dict, start: dict, send: Any) -> None:
    """Answer a plain-text 404/405 start as one-line JSON, keeping its other headers (Allow)."""
    status = int(start["status"])
    if status == 404:
        error = "no such route; GET /docs.json lists the routes"
    else:
        allowed = dict(start.get("headers", [])).get(b"allow", b"").decode("latin-1")
        error = f"method {scope['method']} is not allowed here" + (f"; allowed: {allowed}" if allowed else "")
    body = JSONResponse({"error": error}).body
    kept = [(name, value) for name, value in start.get("headers", [])
            if bytes(name).lower() not in (b"content-type", b"content-length")]
    await send({"type": "http.response.start", "status": status, "headers": [
        *kept, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def endpoint_label(scope: dict) -> str:
    """The `endpoint` label of a request in BentoML's series: the path template of the route that serves it
    (`/classify`; a static folder's `/prefix/{path}`), or UNMATCHED for a path no route serves, so that
    clients cannot add series by inventing paths. Reads the Starlette app's routes from the scope (a copy:
    matching must not change the request)."""
    routes = getattr(getattr(scope.get("app"), "router", None), "routes", None)
    if routes is None:
        return UNMATCHED
    return _template(routes, dict(scope), "") or UNMATCHED


def _template(routes: list, scope: dict, prefix: str) -> str | None:
    """The template of the first of `routes` that matches `scope` (a method mismatch too: a 405 is bounded as
    well), looking into mounted apps' routes. A route that does not show its template (FastAPI's included
    routers, which hold the /version route) is labelled with the request's own path: a fixed path of the app
    unless such a router takes path parameters (ConvForge's take none)."""
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.NONE:
            continue
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            return scope["path"]
        if not isinstance(route, Mount):
            return prefix + path
        if not route.routes:  # a mounted app without routes of its own (static files)
            return f"{prefix}{path}/{{path}}"
        found = _template(route.routes, {**scope, **child}, prefix + path)
        if found:
            return found
    return None


def _replay(body: bytes, receive_next: Any) -> Any:
    """A `receive` that hands the buffered body to the app once, then the client's own messages."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive_next()

    return receive
