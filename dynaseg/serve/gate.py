"""Admission and concurrency control: bounded work in flight, 503 beyond it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from anyio import to_thread

from dynaseg.serve.limits import RequestError

__all__ = ["InferenceGate"]

T = TypeVar("T")


class InferenceGate:
    """At most ``max_concurrency`` requests decode and segment at once (each in a worker thread);
    at most ``queue_size`` more are admitted (reading their body or waiting for a slot). Beyond
    that :meth:`admit` refuses with 503 and ``Retry-After``. Use from one event loop only.
    """

    def __init__(self, *, max_concurrency: int, queue_size: int, retry_after_s: int = 1) -> None:
        self.max_concurrency = max_concurrency
        self.queue_size = queue_size
        self.retry_after_s = retry_after_s
        self.admitted = 0
        self.running = 0
        self._slots = asyncio.Semaphore(max_concurrency)

    @property
    def waiting(self) -> int:
        """Admitted requests not segmenting yet."""
        return self.admitted - self.running

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a place among the ``max_concurrency + queue_size`` admitted requests, or raise 503."""
        if self.admitted >= self.max_concurrency + self.queue_size:
            raise RequestError(
                503,
                f"server busy: {self.running} requests running and {self.waiting} queued "
                f"(queue size {self.queue_size}); retry later",
                headers={"Retry-After": str(self.retry_after_s), "Connection": "close"},
            )
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a worker thread once one of the ``max_concurrency`` slots is free."""
        async with self._slots:
            self.running += 1
            try:
                # Not abandoned on cancellation: the slot stays taken until the thread is done.
                return await to_thread.run_sync(functools.partial(fn, *args, **kwargs))
            finally:
                self.running -= 1

    def state(self) -> dict[str, int]:
        """Counts for /health."""
        return {
            "running": self.running,
            "waiting": self.waiting,
            "max_concurrency": self.max_concurrency,
            "queue_size": self.queue_size,
        }
