"""ASGI middleware in front of every route: body cap, no pickles, outcome metrics, Retry-After.

BentoML 1.4 sets no request-body limit, and its pickle media type (CVE-2024-2912,
CVE-2025-27520) is refused only on its own API routes: here both hold for every route (the
service adds this guard with BentoML's public `add_asgi_middleware`), and so does the concurrency
cap, as 503 + Retry-After (BentoML's own cap answers 429 without it). Outcomes are counted per
prediction route with the bare model version, read from the `name:version` X-Model-Version header.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from services import observability as obs

PICKLE_MEDIA_TYPE = "application/vnd.bentoml+pickle"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class RequestGuard:
    """413 over `max_body_bytes`, 415 for pickle bodies, 503 over `max_concurrency` predictions in flight
    (0: no cap); counts prediction outcomes; Retry-After on 503/429."""

    def __init__(self, app: Any, max_body_bytes: int, routes: dict[str, str], retry_after_s: int = 1,
                 max_concurrency: int = 0) -> None:
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.routes = dict(routes)  # path -> task
        self.retry_after = str(int(retry_after_s))
        self.max_concurrency = int(max_concurrency)
        self.in_flight = 0  # prediction requests past the guard and not yet answered (one event loop: no lock)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type == PICKLE_MEDIA_TYPE:
            await self._reject(scope, receive, send, 415, f"{PICKLE_MEDIA_TYPE} is not accepted")
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await self._reject(scope, receive, send, 413, f"request body over the limit of "
                                                          f"{self.max_body_bytes} bytes")
            return
        if scope["method"] in BODY_METHODS:
            body = await self._read_body(receive)
            if body is None:
                await self._reject(scope, receive, send, 413, f"request body over the limit of "
                                                              f"{self.max_body_bytes} bytes")
                return
            receive = _replay(body, receive)
            task = self.routes.get(scope["path"])
            if task:
                obs.REQUEST_BYTES.labels(task, scope["path"]).observe(len(body))
                await self._admit(scope, receive, send)
                return
        await self.app(scope, receive, self._sending(scope, send))

    async def _admit(self, scope: dict, receive: Any, send: Any) -> None:
        """A prediction, its body read (the connection stays usable): 503 at the cap, else on to the app."""
        if self.max_concurrency and self.in_flight >= self.max_concurrency:
            await self._reject(scope, receive, send, 503, f"over {self.max_concurrency} requests in flight; "
                                                          "retry after the Retry-After seconds")
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, self._sending(scope, send))
        finally:
            self.in_flight -= 1

    async def _read_body(self, receive: Any) -> bytes | None:
        """The whole body, or None once it passes the cap (chunked uploads have no Content-Length)."""
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _sending(self, scope: dict, send: Any) -> Any:
        task = self.routes.get(scope["path"])

        async def wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if status in (429, 503):
                    names = {name.lower() for name, _ in message.get("headers", [])}
                    if b"retry-after" not in names:
                        message = {**message, "headers": [*message.get("headers", []),
                                                          (b"retry-after", self.retry_after.encode())]}
                if task:
                    tag = dict(message.get("headers", [])).get(b"x-model-version", b"none").decode()
                    version = tag.rpartition(":")[2]  # the bare version, as every other series spells it
                    obs.REQUESTS.labels(task, scope["path"], version, obs.status_class(status)).inc()
            await send(message)

        return wrapped

    async def _reject(self, scope: dict, receive: Any, send: Any, status: int, message: str) -> None:
        response = JSONResponse({"error": message}, status_code=status)
        await response(scope, receive, self._sending(scope, send))


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
