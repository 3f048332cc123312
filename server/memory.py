"""Give decoded-frame memory back to the operating system after bursts.

Why: glibc's malloc raises its mmap threshold each time a large mmapped block is freed, so after a
few big frames later ones are carved from the heap arenas, and freed arena memory stays mapped:
a burst of large uploads left the server's RSS gigabytes above idle for good. Pinning the mmap
threshold keeps every large buffer (decoded frames, tensors) in its own mapping, which ``free``
unmaps at once; fewer arenas and an explicit ``malloc_trim`` after large decodes return the rest.
On a libc without these calls (musl, macOS) both functions do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 256 * 1024
TRIM_THRESHOLD_BYTES = 4 * 1024 * 1024
ARENA_MAX = 2
# A request that decoded at least this many pixels trims the heap afterwards (a trim walks the
# free lists: cheap next to decoding 8 M pixels, wasteful after every small query).
TRIM_AFTER_PIXELS = 8 * 1024 * 1024

_lock = threading.Lock()
_libc: ctypes.CDLL | None = None
_configured = False


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt  # noqa: B018 - glibc only: raises AttributeError elsewhere
            libc.malloc_trim  # noqa: B018
        except (OSError, AttributeError):
            return None
        _libc = libc
    return _libc


def configure_allocator() -> bool:
    """Pin glibc's mmap and trim thresholds and cap its arenas (once per process).

    Returns whether the settings were applied (False off glibc).
    """
    global _configured
    with _lock:
        if _configured:
            return True
        libc = _glibc()
        if libc is None:
            log.info("not glibc: allocator settings left as they are")
            return False
        applied = [
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            libc.mallopt(M_ARENA_MAX, ARENA_MAX),
        ]
        _configured = all(applied)
        if not _configured:
            log.warning("mallopt refused some allocator settings: %s", applied)
        return _configured


def release_memory(decoded_pixels: int) -> None:
    """After a request that decoded ``decoded_pixels``, hand free heap pages back to the OS."""
    if decoded_pixels < TRIM_AFTER_PIXELS:
        return
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
