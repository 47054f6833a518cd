"""Rate-limited logs: a flood of one message (accept errors, refused connections, disconnects)
writes a few lines and a count, not megabytes of tracebacks."""

from __future__ import annotations

import logging
import time

__all__ = ["RepeatFilter", "install_repeat_filter"]

# The loggers a server under attack repeats on: asyncio's accept errors, uvicorn's protocol
# warnings ("Invalid HTTP request received."), the service's own connection and request lines.
FLOODED_LOGGERS = ("asyncio", "uvicorn.error", "dynaseg.serve")


class RepeatFilter(logging.Filter):
    """Lets through at most ``burst`` records of one message template per ``window_s`` seconds;
    only the first of them keeps its traceback. The first record let through after some were
    dropped says how many."""

    def __init__(self, *, burst: int = 5, window_s: float = 10.0) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._windows: dict[tuple[str, int, str], tuple[float, int, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        start, passed, dropped = self._windows.get(key, (now, 0, 0))
        if now - start >= self.window_s:
            start, passed = now, 0
        if passed >= self.burst:
            self._windows[key] = (start, passed, dropped + 1)
            return False
        if passed > 0:
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        if dropped:
            record.msg = f"{record.msg} ({dropped} more like this not logged)"
        self._windows[key] = (start, passed + 1, 0)
        if len(self._windows) > 1000:  # many distinct messages: forget the oldest windows
            for old in list(self._windows)[:500]:
                del self._windows[old]
        return True


def install_repeat_filter(*, burst: int = 5, window_s: float = 10.0) -> None:
    """Add one :class:`RepeatFilter` to each of ``FLOODED_LOGGERS`` (once per process)."""
    for name in FLOODED_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, RepeatFilter) for f in log.filters):
            log.addFilter(RepeatFilter(burst=burst, window_s=window_s))
