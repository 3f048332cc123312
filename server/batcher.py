"""Micro-batching: concurrent requests share one model call.

Why a thread and not an asyncio task: the model call is blocking torch (and, on a GPU, FAISS, whose
GPU indexes are not thread-safe), so exactly one worker thread owns it. Request threads put an item
on a bounded queue and wait on a ``concurrent.futures.Future``; the worker takes the first item,
waits at most ``max_wait_s`` for more (up to ``max_batch``), runs ``process`` once for all of them
and resolves each future. A full queue is refused at once (``QueueFullError``, the server's 503)
instead of growing without limit: under overload, latency stays bounded and clients back off.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

_STOP = object()


class QueueFullError(RuntimeError):
    """The batch queue is full; the caller should retry later."""


class BatcherClosedError(RuntimeError):
    """The batcher is shut down (server stopping)."""


class MicroBatcher(Generic[Item, Result]):
    """A bounded queue in front of one worker thread that processes items in batches.

    ``process(items)`` returns one result per item, in order; an entry that is an exception is
    raised to that item's caller only. If ``process`` itself raises, every item of the batch gets
    the exception (and the worker keeps running). ``on_batch(size, seconds)`` is called after
    each batch (metrics). ``expect_more()`` says whether items are on their way (requests still
    decoding): when it says no and the queue is empty, the batch starts at once instead of
    waiting ``max_wait_s`` for company that cannot come, so a lone request pays no batching delay.
    """

    def __init__(
        self,
        process: Callable[[list[Item]], Sequence[Result | BaseException]],
        *,
        max_batch: int,
        max_wait_s: float,
        queue_size: int,
        name: str = "vvireid-batcher",
        on_batch: Callable[[int, float], None] | None = None,
        expect_more: Callable[[], bool] | None = None,
    ) -> None:
        if max_batch < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError(
                f"need max_batch >= 1, queue_size >= 1, max_wait_s >= 0; "
                f"got {max_batch}, {queue_size}, {max_wait_s}"
            )
        self._process = process
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._on_batch = on_batch
        self._expect_more = expect_more
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> MicroBatcher[Item, Result]:
        self._thread.start()
        return self

    @property
    def depth(self) -> int:
        """Items waiting in the queue (not counting the batch being processed)."""
        return self._queue.qsize()

    def submit(self, item: Item) -> Future[Result]:
        """Queue ``item``; the future resolves when its batch is done.

        Raises:
            QueueFullError: the queue holds ``queue_size`` items already.
            BatcherClosedError: the batcher was closed.
        """
        if self._closed.is_set():
            raise BatcherClosedError("the server is shutting down")
        future: Future[Result] = Future()
        try:
            self._queue.put_nowait((item, future))
        except queue.Full:
            raise QueueFullError(
                f"the query queue is full ({self._queue.maxsize} waiting); retry shortly"
            ) from None
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting items, let the worker finish what is queued, and join it."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)
        self._fail_pending()

    def _fail_pending(self) -> None:
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                return
            if entry is not _STOP and entry[1].set_running_or_notify_cancel():
                entry[1].set_exception(BatcherClosedError("the server is shutting down"))

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = self._collect(first)
            self._run_batch(batch)
            if stop:
                return

    def _collect(self, first: tuple) -> tuple[list[tuple], bool]:
        """The first item plus whatever arrives within ``max_wait_s``, up to ``max_batch``."""
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            if self._queue.empty() and self._expect_more is not None and not self._expect_more():
                break
            remaining = deadline - time.monotonic()
            try:
                if remaining > 0:
                    entry = self._queue.get(timeout=remaining)
                else:
                    entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is _STOP:
                return batch, True
            batch.append(entry)
        return batch, False

    def _run_batch(self, batch: list[tuple]) -> None:
        # Callers that gave up (timed out and cancelled) are skipped, not computed.
        live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        start = time.perf_counter()
        try:
            results = list(self._process([item for item, _ in live]))
            if len(results) != len(live):
                raise RuntimeError(f"batch of {len(live)} items gave {len(results)} results")
        except Exception as exc:  # noqa: BLE001 - the worker must survive any batch failure
            log.exception("batch of %d failed", len(live))
            for _, fut in live:
                fut.set_exception(exc)
            return
        finally:
            if self._on_batch is not None:
                self._on_batch(len(live), time.perf_counter() - start)
        for (_, fut), result in zip(live, results, strict=True):
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)
