"""The uvicorn server around the app: its listening socket, connection cap and logs.

uvicorn's settings where it has them (keep-alive timeout, request head size, listen backlog); the
rest is the connection guard (``connections.py``) and an accept loop that applies its cap before
accepting: at the cap, the oldest idle connection is closed to make room, or, when every
connection has a request in progress, new ones wait in the kernel's listen queue. So connections
never take more file descriptors than the cap, whatever arrives at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import resource
import socket

import uvicorn
from fastapi import FastAPI

from dynaseg.errors import UserError
from dynaseg.serve.connections import ConnectionGuard, guarded_protocol
from dynaseg.serve.limits import ServeLimits
from dynaseg.serve.logs import install_repeat_filter

__all__ = ["GuardedServer", "fit_connections_to_fd_limit", "listen", "make_server"]

logger = logging.getLogger("dynaseg.serve")

MAX_HEAD_BYTES = 16 * 1024  # of a request head still incomplete (h11's default, stated): 400 beyond
BACKLOG = 2048  # connections the kernel queues until accepted (uvicorn's default)
SPARE_FDS = 64  # file descriptors kept for everything but connections (logs, libraries)
ACCEPT_BATCH = 16  # connections accepted per event-loop turn
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def fit_connections_to_fd_limit(limits: ServeLimits) -> ServeLimits:
    """``limits`` with ``max_connections`` that the open-files limit (``ulimit -n``) can hold:
    the soft limit is raised towards the hard one if needed, else the cap is lowered (logged)."""
    needed = limits.max_connections + SPARE_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        fitted = max(2, soft - SPARE_FDS)
        logger.warning(
            "--max-connections %d lowered to %d: the open-files limit (ulimit -n) is %d",
            limits.max_connections,
            fitted,
            soft,
        )
        return dataclasses.replace(limits, max_connections=fitted)
    return limits


def listen(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port``; :class:`UserError` when it cannot
    be had (bad address, port in use)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, OverflowError) as e:
        raise UserError(f"cannot listen on {host}:{port}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


class GuardedServer(uvicorn.Server):
    """uvicorn's server accepting on ``listener`` itself, within ``guard``'s cap."""

    def __init__(
        self, config: uvicorn.Config, *, listener: socket.socket, guard: ConnectionGuard
    ) -> None:
        super().__init__(config)
        self.listener = listener
        self.guard = guard
        self._accepting = False
        self._setups: set[asyncio.Task] = set()

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.getsockname()[:2]

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # everything but listening: that is done here
        self._loop = asyncio.get_running_loop()
        self.guard.on_room = self._resume
        self._resume()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._pause()
        self.listener.close()
        await super().shutdown(sockets=sockets)

    def _resume(self) -> None:
        if not self._accepting and self.listener.fileno() >= 0:
            self._loop.add_reader(self.listener.fileno(), self._accept)
            self._accepting = True

    def _pause(self) -> None:
        if self._accepting:
            self._loop.remove_reader(self.listener.fileno())
            self._accepting = False

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if not self.guard.make_room():
                self._pause()  # every connection is busy: new ones wait in the listen queue
                return
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:
                if e.errno not in _OUT_OF_RESOURCES:
                    raise
                logger.warning("cannot accept connections (%s): retrying in 1 s", e.strerror)
                self._pause()
                self._loop.call_later(1.0, self._resume)
                return
            conn.setblocking(False)
            self.guard.pending += 1
            setup = self._loop.create_task(self._set_up(conn))
            self._setups.add(setup)
            setup.add_done_callback(self._setups.discard)

    async def _set_up(self, conn: socket.socket) -> None:
        config = self.config
        try:
            await self._loop.connect_accepted_socket(
                lambda: config.http_protocol_class(
                    config=config, server_state=self.server_state, app_state=self.lifespan.state
                ),
                conn,
            )
        except OSError:
            conn.close()
        finally:
            self.guard.pending -= 1


def make_server(
    app: FastAPI, *, limits: ServeLimits, listener: socket.socket, log_level: str = "info"
) -> GuardedServer:
    """The server ``dynaseg serve`` runs: ``app`` under ``limits``, accepting on ``listener``
    (from :func:`listen`)."""
    guard = ConnectionGuard(
        max_connections=limits.max_connections,
        header_timeout_s=limits.header_timeout_s,
        send_timeout_s=limits.send_timeout_s,
    )
    config = uvicorn.Config(
        app,
        http=guarded_protocol(guard),
        ws="none",
        lifespan="off",
        log_level=log_level,
        timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        backlog=BACKLOG,
    )
    logging.getLogger("dynaseg.serve").setLevel(log_level.upper())
    install_repeat_filter()
    return GuardedServer(config, listener=listener, guard=guard)
