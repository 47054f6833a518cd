"""Replies that keep their admission place until they are sent, streamed at the client's pace."""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from dynaseg.serve.gate import Place

__all__ = ["HeldReply"]

CHUNK_BYTES = 64 * 1024  # uvicorn waits for the client to drain each chunk past 64 KiB buffered


class HeldReply(Response):
    """A 200 reply sent in ``CHUNK_BYTES`` pieces, each handed over once the client has taken the
    previous ones, holding ``place`` until the last piece is handed over (or the client is gone).

    So the bytes of unsent replies are counted among the admission places, and what a connection
    buffers beyond them is about one chunk. A client that stops reading is disconnected by the
    connection's send timeout (``connections.py``), which ends the wait.
    """

    def __init__(self, content: bytes | memoryview, *, media_type: str, place: Place) -> None:
        super().__init__(content, media_type=media_type)
        self.place = place

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.place.state = "sending"
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            body = memoryview(self.body)
            for start in range(0, len(body), CHUNK_BYTES):
                piece = bytes(body[start : start + CHUNK_BYTES])
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.body = b""
            self.place.release()
