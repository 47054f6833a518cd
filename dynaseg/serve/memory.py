"""The C allocator's settings for a long-running server process.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), after
which image-sized buffers come from the heap and their pages often stay with the process: peak
memory then creeps up with every mask pasted (measured: +200 MB over 100 masks of 4 MP). A fixed
threshold maps every block of 1 MiB or more on its own and hands it back when freed, so a
request's peak memory is what it holds at once (docs/serve.md, "Bounded memory").
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["MMAP_THRESHOLD_BYTES", "return_large_blocks"]

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1024 * 1024


def return_large_blocks() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD_BYTES`` (also ends its automatic raising);
    False where the C library is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
