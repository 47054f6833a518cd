"""Request bodies as they arrive: a minimum transfer rate, a size limit and a shared byte budget.

Bodies are read before a request takes one of the admission places (``gate.py``), so a slow upload
never holds what decoding and inference need; it holds only the bytes it has sent, and is cut with
408 as soon as it falls behind ``min_upload_rate`` (after ``upload_grace_s``).
"""

from __future__ import annotations

import time

import anyio
from starlette.types import Receive

from dynaseg.serve.limits import CLOSE, RequestError, ServeLimits

__all__ = ["ClientGone", "UploadBudget", "read_body"]


class ClientGone(Exception):
    """The client closed its connection before its request was read: nobody to answer."""


class UploadBudget:
    """Bytes held by bodies still arriving, together at most ``max_bytes`` (503 beyond).

    Use from one event loop only.
    """

    def __init__(self, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self.uploads = 0

    def take(self, size: int) -> None:
        if self.held + size > self.max_bytes:
            raise RequestError(
                503,
                f"server busy: {self.uploads} uploads in progress hold {self.held} bytes; retry later",
                headers={"Retry-After": "1", **CLOSE},
            )
        self.held += size

    def give_back(self, size: int) -> None:
        self.held -= size


def _deadline(*, start: float, received: int, limits: ServeLimits) -> float:
    """When the next bytes must have arrived: the grace period plus the time ``received`` bytes
    may take at ``min_upload_rate``, and never after ``read_timeout_s``."""
    allowed = limits.upload_grace_s + received / limits.min_upload_rate
    return start + min(allowed, limits.read_timeout_s)


def _too_slow(*, received: int, elapsed: float, limits: ServeLimits) -> RequestError:
    if elapsed >= limits.read_timeout_s:
        detail = f"request body not received within {limits.read_timeout_s:g} s"
    else:
        detail = (
            f"request body too slow: {received} bytes in {elapsed:.1f} s, below the minimum "
            f"of {limits.min_upload_rate} bytes/s after the first {limits.upload_grace_s:g} s"
        )
    return RequestError(408, detail, headers=CLOSE)


async def _next_message(receive: Receive, *, deadline: float) -> dict | None:
    """The next ASGI receive message, or None when ``deadline`` passes first."""
    with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
        return await receive()
    return None


async def read_body(receive: Receive, *, limits: ServeLimits, budget: UploadBudget) -> bytes:
    """The request body, counted while it streams in: 413 as soon as it passes ``max_bytes``
    (whatever Content-Length said), 408 when it falls behind the minimum rate or takes over
    ``read_timeout_s``, 503 when the upload budget is spent, 400 when empty; :class:`ClientGone`
    when the client disconnects."""
    start, received, chunks = time.monotonic(), 0, []
    budget.uploads += 1
    try:
        while True:
            message = await _next_message(
                receive, deadline=_deadline(start=start, received=received, limits=limits)
            )
            if message is None:
                elapsed = time.monotonic() - start
                raise _too_slow(received=received, elapsed=elapsed, limits=limits)
            if message["type"] == "http.disconnect":
                raise ClientGone(f"after {received} bytes of its body")
            chunk = message.get("body", b"")
            if received + len(chunk) > limits.max_bytes:
                raise RequestError(
                    413,
                    f"request body exceeds the limit of {limits.max_bytes} bytes",
                    headers=CLOSE,
                )
            budget.take(len(chunk))
            received += len(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if not received:
            raise RequestError(400, "empty request body: send an image")
        return b"".join(chunks)
    finally:
        budget.uploads -= 1
        budget.give_back(received)
