"""torch.distributed process groups: setup from torchrun's environment, teardown, failure spreading.

The collectives themselves (reductions, gathers) are in ``dynaseg/utils/comm.py``."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from dynaseg.errors import UserError
from dynaseg.utils.comm import get_rank, get_world_size, is_distributed

__all__ = ["init_distributed", "cleanup", "spread_failures", "FailureWatch", "PeerRankFailed"]

logger = logging.getLogger("dynaseg.distributed")
_FAILED = "dynaseg/failed"  # store key: "rank R: Type: message" of the first rank that failed
_ACKS = "dynaseg/failure_acks"


def init_distributed(device: str) -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE > 1) and return this rank's device.

    ``device`` is "auto", "cpu", "cuda" or "cuda:N"; under torchrun each rank takes cuda:LOCAL_RANK.
    The backend is NCCL on CUDA and gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device} requested but CUDA is not available")
    if device == "cuda":
        device = f"cuda:{local_rank if world_size > 1 else 0}"
    if world_size > 1 and not is_distributed():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return torch.device(device)


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


class PeerRankFailed(UserError, RuntimeError):
    """This rank stops because another rank raised an error (named in the message)."""


class FailureWatch:
    """Spreads the first error of any rank through the process group's key-value store.

    The failing rank ``publish``es "rank R: Type: message" and waits (at most ``ack_timeout_s``)
    until the other ranks have seen it, so that the store outlives the news even where the failing
    rank hosts it. On every rank a daemon thread polls the store every ``poll_s``; on news of a
    failure elsewhere it logs it and, unless the process has ended within ``grace_s`` (with gloo a
    collective waiting for the failed rank errors out as soon as that rank exits), ends the process
    with exit status 1: a rank blocked in a collective (NCCL) cannot be interrupted otherwise.
    """

    def __init__(
        self,
        store: dist.Store,
        *,
        rank: int,
        world_size: int,
        poll_s: float = 1.0,
        grace_s: float = 30.0,
        ack_timeout_s: float = 5.0,
    ) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.poll_s, self.grace_s, self.ack_timeout_s = poll_s, grace_s, ack_timeout_s
        self.failure: str | None = None  # the first failure seen, "rank R: Type: message"
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="dynaseg-failure-watch", daemon=True
        )

    def start(self) -> FailureWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _read(self) -> str | None:
        if self.failure is None and self.store.check([_FAILED]):
            self.failure = self.store.get(_FAILED).decode(errors="replace")
        return self.failure

    def _watch(self) -> None:
        try:
            while not self._stop.wait(self.poll_s):
                failure = self._read()
                if failure is None:
                    continue
                if not failure.startswith(f"rank {self.rank}:"):
                    logger.error("rank %d stops: %s", self.rank, _peer_message(failure))
                    self.store.add(_ACKS, 1)
                break
        except Exception:  # the store is gone (its host exited): collectives fail on their own
            if self._stop.is_set() or self.failure is None:
                return
        if self._stop.wait(self.grace_s):
            return
        logger.error(
            "rank %d: still running %g s after %s; exiting",
            self.rank,
            self.grace_s,
            _peer_message(self.failure or "another rank failed"),
        )
        logging.shutdown()
        os._exit(1)

    def publish(self, error: BaseException) -> str:
        """Record ``error`` as this rank's failure unless another rank's came first; returns the first."""
        mine = f"rank {self.rank}: {_describe(error)}"
        try:
            first = self.store.compare_set(_FAILED, "", mine).decode(errors="replace")
        except Exception:  # store unreachable: its host (another rank) has exited
            return self.failure or mine
        self.failure = self.failure or first
        if first == mine:
            deadline = time.monotonic() + self.ack_timeout_s
            with contextlib.suppress(Exception):
                while (
                    self.store.add(_ACKS, 0) < self.world_size - 1 and time.monotonic() < deadline
                ):
                    time.sleep(0.05)
        return first


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"


def _peer_message(failure: str) -> str:
    rank, _, error = failure.partition(": ")
    return f"{rank} failed: {error}"


@contextlib.contextmanager
def spread_failures(*, poll_s: float = 1.0, grace_s: float = 30.0) -> Iterator[None]:
    """Make an error on one rank end every rank, naming the failed rank, instead of a hang.

    The rank that raised re-raises its error; the others raise ``PeerRankFailed`` naming it (or exit
    with status 1 after ``grace_s`` if blocked). No-op without a process group.
    """
    default_store = getattr(
        dist.distributed_c10d, "_get_default_store", None
    )  # private, stable since torch 1.x
    store = default_store() if is_distributed() and default_store is not None else None
    if store is None:
        yield
        return
    watch = FailureWatch(
        store, rank=get_rank(), world_size=get_world_size(), poll_s=poll_s, grace_s=grace_s
    ).start()
    try:
        yield
    except BaseException as e:
        first = watch.publish(e)
        # The watch keeps running: it ends this process after ``grace_s`` if shutting down hangs.
        if first.startswith(f"rank {watch.rank}:") or first.endswith(_describe(e)):
            raise  # this rank's own error (or the same error everywhere, e.g. an unreadable checkpoint)
        raise PeerRankFailed(f"rank {watch.rank} stopped: {_peer_message(first)}") from e
    watch.stop()
