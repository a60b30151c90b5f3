"""The error a client's request can cause: an HTTP 4xx with a one-line message."""

from __future__ import annotations

from models._errors import ConvForgeError


class InputError(ConvForgeError):
    """A bad request (undecodable image, too many images, wrong field): `status` is its 4xx code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Overloaded(Exception):
    """The server cannot take this now (a batching queue over its latency budget, the pixel budget spent): HTTP
    503, to which services/guard.py adds Retry-After as to every 503."""

    status = 503
