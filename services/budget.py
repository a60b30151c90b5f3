"""The decoded pixels a server worker holds for its requests in flight: at most `serve.max_pixels_in_flight`.

The body cap bounds what a request sends, not what it decodes to: a 100 KB PNG of 4096 x 4096
decodes to 50 MB, and 32 of them at once took a worker to 6.6 GB. Each request holds its pixels
as a `Claim` while they are in memory: an upload while it decodes (its header's size, a JPEG's at
its draft scale), its model inputs and its `targets` until it is answered. A claim that would pass
the budget is refused with Overloaded (503 + Retry-After: the server is busy, the request is
fine), unless the request holds everything held: alone, any request within the per-image limits
runs. A request cancelled by BentoML's timeout (504) gets no more pixels, so its worker thread
stops at its next upload instead of decoding the rest for nobody.

Pixels given back leave the process too (`return_freed_memory`): glibc would otherwise keep the
buffers of decoded uploads for reuse in the arena of each thread that decoded one.
"""

from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager
from typing import Iterator

from services.errors import Overloaded


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 4 << 20  # buffers this large and larger: a 1024 x 1024 RGB image in Pillow's 4 bytes a pixel


def return_freed_memory() -> bool:
    """Have glibc map each buffer of MMAP_THRESHOLD bytes or more on its own and unmap it when freed. By default
    it raises that threshold to the size of each large buffer freed (up to 32 MB), so the next ones come from its
    arenas and stay there after they are freed, one arena per thread: a worker's memory then grew with the number
    of threads that had decoded a large upload, whatever the budget (bench/upload_memory.py, 4096 px PNGs on
    /detect: peak 1,211 MB at 16 clients, 1,724 MB at 64). False where the C library has no glibc mallopt."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


class RequestGone(Exception):
    """The request was cancelled (BentoML's 504): work for it stops."""


class PixelBudget:
    """At most `capacity` decoded pixels held at once by the claims on it, unless one claim holds them all."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.held = 0
        self.lock = threading.Lock()  # claims are held and given back from worker threads and the event loop

    def claim(self) -> Claim:
        """A new request's claim, holding nothing yet."""
        return Claim(self)


class Claim:
    """One request's pixels on a PixelBudget."""

    def __init__(self, budget: PixelBudget) -> None:
        self.budget = budget
        self.held = 0
        self.closed = False  # cancelled or released: no more pixels

    def hold(self, pixels: int) -> None:
        """Hold `pixels` more until `release`; Overloaded when other requests hold so much that the budget would
        pass, RequestGone once this request was cancelled."""
        budget = self.budget
        with budget.lock:
            if self.closed:
                raise RequestGone("the request was cancelled")
            if budget.held > self.held and budget.held + pixels > budget.capacity:
                raise Overloaded(f"over {budget.capacity} decoded pixels in flight; retry after the Retry-After "
                                 "seconds")
            budget.held += pixels
            self.held += pixels

    def give_back(self, pixels: int) -> None:
        """Stop holding `pixels` (at most what is held)."""
        with self.budget.lock:
            pixels = min(pixels, self.held)
            self.held -= pixels
            self.budget.held -= pixels

    @contextmanager
    def holding(self, pixels: int) -> Iterator[None]:
        """`pixels` held for the block (a decode)."""
        self.hold(pixels)
        try:
            yield
        finally:
            self.give_back(pixels)

    def cancel(self) -> None:
        """The request was cancelled: no more pixels (what it holds stays held until `release`)."""
        self.closed = True

    def release(self) -> None:
        """The request is answered: everything given back, no more pixels."""
        self.closed = True
        self.give_back(self.held)
