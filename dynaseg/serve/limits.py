"""Request limits of the inference service: body size, content type, and the 4xx errors they raise."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
from starlette.datastructures import Headers
from starlette.requests import Request

__all__ = ["RequestError", "ServeLimits", "request_kind", "check_declared_length", "read_body"]


@dataclass(frozen=True, kw_only=True)
class ServeLimits:
    """What one service instance accepts.

    Attributes:
        max_bytes: largest request body (raw image or whole multipart upload).
        max_pixels: largest ``width * height``, read from the image header before decoding.
        max_concurrency: images decoded and segmented at once.
        queue_size: further requests admitted (reading their body or waiting for a slot) before
            new ones are refused with 503.
        read_timeout_s: time an admitted request has to send its whole body (408 beyond), so
            stalled uploads cannot hold queue places forever.
    """

    max_bytes: int = 16 * 2**20
    max_pixels: int = 25_000_000
    max_concurrency: int = 1
    queue_size: int = 16
    read_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.queue_size < 0:
            raise ValueError(f"queue_size must be at least 0, got {self.queue_size}")
        if not self.read_timeout_s > 0:
            raise ValueError(f"read_timeout_s must be positive, got {self.read_timeout_s}")


class RequestError(Exception):
    """A request the service refuses; answered as ``{"detail": detail}`` with ``status``."""

    def __init__(self, status: int, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


_RAW_TYPES = ("application/octet-stream",)


def request_kind(content_type: str | None) -> str:
    """``"raw"`` (an image body) or ``"multipart"`` (form upload) from a Content-Type; 415 otherwise."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        return "multipart"
    if media.startswith("image/") or media in _RAW_TYPES:
        return "raw"
    got = f"unsupported content type '{media}'" if media else "missing Content-Type header"
    raise RequestError(
        415,
        f"{got}: send the image as image/* (or "
        "application/octet-stream) or as multipart/form-data with a 'file' field",
        headers={"Connection": "close"},
    )


def check_declared_length(headers: Headers, *, max_bytes: int) -> None:
    """Refuse a request whose Content-Length is malformed (400) or over ``max_bytes`` (413)."""
    declared = headers.get("content-length")
    if declared is None:
        return
    if not declared.strip().isdigit():
        raise RequestError(400, f"invalid Content-Length header {declared!r}")
    if int(declared) > max_bytes:
        raise RequestError(
            413,
            f"request body of {int(declared)} bytes exceeds the limit of {max_bytes} bytes",
            headers={"Connection": "close"},
        )


async def read_body(request: Request, *, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, counted while it streams in: 413 as soon as it passes ``max_bytes``
    (whatever Content-Length said, chunked bodies included), 408 when it takes over ``timeout_s``,
    400 when it is empty."""
    check_declared_length(request.headers, max_bytes=max_bytes)
    body = bytearray()
    with anyio.move_on_after(timeout_s) as scope:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise RequestError(
                    413,
                    f"request body exceeds the limit of {max_bytes} bytes",
                    headers={"Connection": "close"},
                )
    if scope.cancelled_caught:
        raise RequestError(
            408,
            f"request body not received within {timeout_s:g} s",
            headers={"Connection": "close"},
        )
    if not body:
        raise RequestError(400, "empty request body: send an image")
    return bytes(body)
