"""Connection-level limits uvicorn lacks: a cap on open connections, a deadline for the request
head, and a send timeout for clients that stop reading.

uvicorn's own settings cover the rest (``server.py``): the head size (``h11_max_incomplete_event_size``),
the keep-alive timeout, the listen backlog. Its ``limit_concurrency`` answers 503 once a request
arrives but neither closes idle sockets nor keeps them from using up file descriptors, so the cap
here is applied when connections are accepted (``server.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["ConnectionGuard", "GuardedH11Protocol", "guarded_protocol"]

logger = logging.getLogger("dynaseg.serve")


class ConnectionGuard:
    """The open connections of one server, oldest first: at most ``max_connections``, counting
    those accepted and not yet set up (``pending``). Use from the server's event loop only."""

    def __init__(
        self, *, max_connections: int, header_timeout_s: float, send_timeout_s: float
    ) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.send_timeout_s = send_timeout_s
        self.open: dict[GuardedH11Protocol, None] = {}
        self.pending = 0
        self.on_room: Callable[[], None] = lambda: None  # called when a connection closes

    def make_room(self) -> bool:
        """Whether one more connection may be accepted; at the cap, closes the oldest connection
        with no request in progress (idle, or still sending its request head) to make room."""
        if len(self.open) + self.pending < self.max_connections:
            return True
        idle = next((c for c in self.open if c.is_idle()), None)
        if idle is None:
            return False
        logger.info(
            "closed the oldest idle connection for a new one (--max-connections %d)",
            self.max_connections,
        )
        idle.drop()
        return True

    def enter(self, connection: GuardedH11Protocol) -> None:
        self.open[connection] = None

    def leave(self, connection: GuardedH11Protocol) -> None:
        if self.open.pop(connection, False) is None:
            self.on_room()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol under a :class:`ConnectionGuard` (set on the subclass): closes a
    connection that sends no complete request head within ``header_timeout_s`` (from its opening
    or from the end of its previous reply), and one that takes none of its reply for
    ``send_timeout_s``."""

    guard: ConnectionGuard

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._answered: object = None  # the request cycle whose head already arrived
        self.guard.enter(self)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.leave(self)
        self._cancel_timers()
        super().connection_lost(exc)

    def is_idle(self) -> bool:
        """No request in progress: nothing received yet, a partial head, or between requests."""
        return self.cycle is None or self.cycle.response_complete

    def drop(self) -> None:
        """Close at once, discarding anything unsent."""
        self.guard.leave(self)
        self._cancel_timers()
        self.transport.abort()

    # ------------------------------------------------------------------ request head deadline
    def _await_head(self) -> None:
        self._cancel(self._head_timer)
        self._head_timer = self.loop.call_later(self.guard.header_timeout_s, self._head_too_slow)

    def _head_too_slow(self) -> None:
        logger.info(
            "closed a connection that sent no complete request head within %g s",
            self.guard.header_timeout_s,
        )
        self.drop()

    def _head_arrived(self) -> bool:
        """Whether a request head arrived since the last call (uvicorn made a new cycle)."""
        if self.cycle is None or self.cycle is self._answered:
            return False
        self._answered = self.cycle
        return True

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_arrived():
            self._cancel(self._head_timer)
            self._head_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request
        if not self.transport.is_closing() and not self._head_arrived():
            self._await_head()  # the next request's head (uvicorn's keep-alive timer runs too)

    # ------------------------------------------------------------------ send timeout
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.guard.send_timeout_s, self._not_reading)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel(self._send_timer)
        self._send_timer = None

    def _not_reading(self) -> None:
        logger.info(
            "disconnected a client that took none of its reply for %g s", self.guard.send_timeout_s
        )
        self.drop()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()

    def _cancel_timers(self) -> None:
        self._cancel(self._head_timer)
        self._cancel(self._send_timer)
        self._head_timer = self._send_timer = None


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """The protocol class to give uvicorn (``Config(http=...)``) for connections under ``guard``."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})
