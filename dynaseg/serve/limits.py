"""What one service instance accepts, and the 4xx errors its checks raise."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import Headers

__all__ = ["RequestError", "ServeLimits", "request_kind", "check_declared_length"]


@dataclass(frozen=True, kw_only=True)
class ServeLimits:
    """What one service instance accepts (docs/serve.md, "Limits and errors" and "Bounded memory").

    Attributes:
        max_bytes: largest request body (raw image or whole multipart upload).
        max_pixels: largest ``width * height``, read from the image header before decoding.
        max_concurrency: images decoded, segmented and encoded at once.
        queue_size: further requests admitted once their body is in (waiting for a slot, or
            sending their reply) before new ones are refused with 503.
        read_timeout_s: the longest a request may take to send its whole body (408 beyond).
        min_upload_rate: bytes per second a body must average once ``upload_grace_s`` has passed
            (408 as soon as it falls behind), so a trickling body is cut early.
        upload_grace_s: time a body may take before ``min_upload_rate`` applies.
        max_connections: open connections; at the cap a new one replaces the oldest connection
            with no request in progress, or is closed at once when there is none.
        header_timeout_s: time a connection has to send a complete request head, from its
            opening or from the end of its previous reply; closed beyond.
        keep_alive_s: an idle keep-alive connection is closed after this (uvicorn's
            ``timeout_keep_alive``).
        send_timeout_s: a client that takes no more of its reply for this long is disconnected.
    """

    max_bytes: int = 16 * 2**20
    max_pixels: int = 25_000_000
    max_concurrency: int = 1
    queue_size: int = 16
    read_timeout_s: float = 60.0
    min_upload_rate: int = 16_384
    upload_grace_s: float = 5.0
    max_connections: int = 256
    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    send_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_concurrency", "min_upload_rate"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_connections < 2:
            raise ValueError(f"max_connections must be at least 2, got {self.max_connections}")
        if self.queue_size < 0:
            raise ValueError(f"queue_size must be at least 0, got {self.queue_size}")
        for name in ("read_timeout_s", "header_timeout_s", "keep_alive_s", "send_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.upload_grace_s < 0:
            raise ValueError(f"upload_grace_s must be at least 0, got {self.upload_grace_s}")

    @property
    def places(self) -> int:
        """Requests admitted at once: running, queued or sending their reply."""
        return self.max_concurrency + self.queue_size

    @property
    def upload_budget(self) -> int:
        """Bytes that bodies still arriving may hold together."""
        return self.places * self.max_bytes


class RequestError(Exception):
    """A request the service refuses; answered as ``{"detail": detail}`` with ``status``."""

    def __init__(self, status: int, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


CLOSE = {"Connection": "close"}
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
        headers=CLOSE,
    )


def check_declared_length(headers: Headers, *, max_bytes: int) -> None:
    """Refuse a request whose Content-Length is malformed (400) or over ``max_bytes`` (413)."""
    declared = headers.get("content-length")
    if declared is None:
        return
    if not declared.strip().isdigit():
        raise RequestError(400, f"invalid Content-Length header {declared!r}", headers=CLOSE)
    if int(declared) > max_bytes:
        raise RequestError(
            413,
            f"request body of {int(declared)} bytes exceeds the limit of {max_bytes} bytes",
            headers=CLOSE,
        )
