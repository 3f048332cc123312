"""The one readers-writer lock of the project (bottom layer, so every layer can share it).

Why a lock of our own: ``threading`` has none, and the gallery needs one where many searches run
at once while a rare write swaps in-memory state. The gallery store owns the only instance that
guards its state; callers above it (the server) never stack a second one on top.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers, so writes never starve.

    Not re-entrant: a thread holding the read side must not ask for the write side.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        """Shared access: any number of readers hold it together."""
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """Exclusive access: waits for the current readers, keeps new ones out meanwhile."""
        with self._cond:
            self._writers_waiting += 1
            try:
                self._cond.wait_for(lambda: not self._writer and not self._readers)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
