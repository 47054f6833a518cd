"""Admission and concurrency control: bounded work and unsent replies, 503 beyond them."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from anyio import CapacityLimiter, to_thread

from dynaseg.serve.limits import CLOSE, RequestError

__all__ = ["InferenceGate", "Place"]

T = TypeVar("T")
PlaceState = Literal["waiting", "running", "sending"]


class Place:
    """One admitted request's place: held from the end of its body until the last byte of its
    reply is handed to the connection (or until it fails). :meth:`release` is idempotent."""

    def __init__(self, gate: InferenceGate) -> None:
        self._gate = gate
        self.state: PlaceState = "waiting"

    def release(self) -> None:
        self._gate._places.discard(self)


class InferenceGate:
    """At most ``max_concurrency + queue_size`` requests hold a :class:`Place` (waiting, running or
    sending their reply); beyond that :meth:`admit` refuses with 503 and ``Retry-After``. At most
    ``max_concurrency`` of them decode, segment and encode at once, each in a worker thread, and at
    most ``max_concurrency`` more parse their upload (multipart, image header) in another.
    Use from one event loop only.
    """

    def __init__(self, *, max_concurrency: int, queue_size: int, retry_after_s: int = 1) -> None:
        self.max_concurrency = max_concurrency
        self.queue_size = queue_size
        self.retry_after_s = retry_after_s
        self._places: set[Place] = set()
        self._slots = asyncio.Semaphore(max_concurrency)
        self._parsers: CapacityLimiter | None = None  # made on the event loop, at first use

    def count(self, state: PlaceState) -> int:
        return sum(place.state == state for place in self._places)

    def admit(self) -> Place:
        """A place among the ``max_concurrency + queue_size``, or 503."""
        if len(self._places) >= self.max_concurrency + self.queue_size:
            raise RequestError(
                503,
                f"server busy: {self.count('running')} requests running, {self.count('waiting')} "
                f"queued and {self.count('sending')} sending their reply (queue size "
                f"{self.queue_size}); retry later",
                headers={"Retry-After": str(self.retry_after_s), **CLOSE},
            )
        place = Place(self)
        self._places.add(place)
        return place

    async def parse(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a worker thread, off the event loop (untrusted bytes)."""
        if self._parsers is None:
            self._parsers = CapacityLimiter(self.max_concurrency)
        call = functools.partial(fn, *args, **kwargs)
        return await to_thread.run_sync(call, limiter=self._parsers)

    async def run(self, place: Place, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a worker thread once one of the ``max_concurrency`` slots is free."""
        async with self._slots:
            place.state = "running"
            try:
                # Not abandoned on cancellation: the slot stays taken until the thread is done.
                return await to_thread.run_sync(functools.partial(fn, *args, **kwargs))
            finally:
                place.state = "waiting"

    def state(self) -> dict[str, int]:
        """Counts for /health."""
        return {
            "running": self.count("running"),
            "waiting": self.count("waiting"),
            "sending": self.count("sending"),
            "max_concurrency": self.max_concurrency,
            "queue_size": self.queue_size,
        }
