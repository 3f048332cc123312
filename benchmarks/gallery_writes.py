"""Live-gallery write costs: add latency, open time, bytes per add, query latency under writes.

Usage::

    python benchmarks/gallery_writes.py                              # 10k and 100k, 1536-d
    python benchmarks/gallery_writes.py --sizes 10000,100000 --json  # one JSON object
    python benchmarks/gallery_writes.py --sizes 1000000              # 1M: on request (~13 GB RAM)

For each gallery size, through the product class ``GalleryIndex`` (flat, cosine, SQLite with the
default ``synchronous=FULL``):

* ``add_p50_ms`` / ``add_p99_ms``: ``--adds`` single-tracklet adds, each with a 4 KB thumbnail,
  each committed (acknowledged) before the next;
* ``bytes_per_add``: bytes the process handed to ``write()`` (``/proc/self/io`` ``wchar``)
  during those adds, divided by their number (WAL pages plus checkpoints);
* ``open_s``: ``GalleryIndex.open`` after the adds: snapshot load plus replay of the adds;
* ``query_p50/p99_idle_ms``: one query (k = 10, gallery-modality filter, as the server's default
  cross-modal search) at a time, nothing else running;
* ``query_p50/p99_during_adds_ms``: the same while another thread adds ``--rate`` tracklets per
  second;
* ``write_lock_p50/p99_ms``: how long each of those adds held the write side of the gallery's
  readers-writer lock, i.e. the longest a search could wait for a write (the disk commit happens
  before, outside the lock). On a shared box the query figures move with other load; this one
  says what the design itself costs the readers.

Vectors are random unit vectors: the figures are costs, not retrieval quality.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from vvireid.indexer.store import GalleryIndex, GalleryItem
from vvireid.model.types import Modality

log = logging.getLogger("gallery_writes")
THUMBNAIL = bytes(4096)


def _items(start: int, count: int) -> list[GalleryItem]:
    return [
        GalleryItem(f"t{i}", Modality(i % 2), i % 6, camera=f"cam{i % 6}", pid=i // 4)
        for i in range(start, start + count)
    ]


def _vectors(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    block = rng.standard_normal((count, dim), dtype=np.float32)
    block /= np.linalg.norm(block, axis=1, keepdims=True)
    return block


def _wchar() -> int:
    """Bytes this process passed to write() so far (Linux); 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values), q)), 3)


def build(folder: Path, size: int, dim: int, rng: np.random.Generator) -> GalleryIndex:
    """A gallery of ``size`` tracklets, added in batches, with a snapshot (a normal build)."""
    index = GalleryIndex.create(
        folder, dim=dim, model_fingerprint="bench", similarity="cosine", device="cpu"
    )
    batch = 10_000
    for start in range(0, size, batch):
        count = min(batch, size - start)
        index.add(_items(start, count), _vectors(rng, count, dim), [THUMBNAIL] * count)
    index.save()
    return index


def time_adds(
    index: GalleryIndex, start: int, count: int, dim: int, rng: np.random.Generator
) -> tuple[list[float], float]:
    """Latency (ms) of ``count`` single adds and the bytes written per add."""
    vectors = _vectors(rng, count, dim)
    latencies = []
    before = _wchar()
    for n in range(count):
        t0 = time.perf_counter()
        index.add(_items(start + n, 1), vectors[n : n + 1], [THUMBNAIL])
        latencies.append((time.perf_counter() - t0) * 1000.0)
    return latencies, (_wchar() - before) / count


def time_queries(index: GalleryIndex, queries: np.ndarray) -> list[float]:
    latencies = []
    for n, query in enumerate(queries):
        t0 = time.perf_counter()
        index.search(query, 10, modality=Modality(n % 2))
        latencies.append((time.perf_counter() - t0) * 1000.0)
    return latencies


@contextlib.contextmanager
def lock_hold_times(index: GalleryIndex) -> Iterator[list[float]]:
    """Record how long each write-side hold of the gallery's lock lasts (ms)."""
    held: list[float] = []
    lock = index._lock
    original = lock.write

    @contextlib.contextmanager
    def timed() -> Iterator[None]:
        with original():
            t0 = time.perf_counter()
            try:
                yield
            finally:
                held.append((time.perf_counter() - t0) * 1000.0)

    lock.write = timed  # type: ignore[method-assign]
    try:
        yield held
    finally:
        lock.write = original  # type: ignore[method-assign]


def queries_during_adds(
    index: GalleryIndex, queries: np.ndarray, start: int, rate: float, dim: int
) -> tuple[list[float], int]:
    """Query latencies while a thread adds ``rate`` tracklets per second; returns (ms, adds)."""
    stop = threading.Event()
    added = [0]

    def writer() -> None:
        rng = np.random.default_rng(7)
        period = 1.0 / rate
        next_at = time.perf_counter()
        while not stop.is_set():
            index.add(_items(start + added[0], 1), _vectors(rng, 1, dim), [THUMBNAIL])
            added[0] += 1
            next_at += period
            stop.wait(max(0.0, next_at - time.perf_counter()))

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    time.sleep(0.2)
    try:
        latencies = time_queries(index, queries)
    finally:
        stop.set()
        thread.join()
    return latencies, added[0]


def measure(size: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    rng = np.random.default_rng(size)
    folder = root / f"gallery-{size}"
    started = time.perf_counter()
    index = build(folder, size, args.dim, rng)
    build_s = time.perf_counter() - started
    log.info("built %d x %d in %.1f s", size, args.dim, build_s)
    adds, per_add = time_adds(index, size, args.adds, args.dim, rng)
    index.close()
    t0 = time.perf_counter()
    index = GalleryIndex.open(folder, device="cpu")
    open_s = time.perf_counter() - t0
    queries = _vectors(rng, args.queries, args.dim)
    time_queries(index, queries[:3])  # warm-up
    idle = time_queries(index, queries)
    with lock_hold_times(index) as held:
        busy, streamed = queries_during_adds(
            index, queries, size + args.adds, args.rate, args.dim
        )
    index.close()
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "add_p50_ms": _percentile(adds, 50),
        "add_p99_ms": _percentile(adds, 99),
        "open_s": round(open_s, 3),
        "bytes_per_add": int(per_add),
        "query_p50_idle_ms": _percentile(idle, 50),
        "query_p99_idle_ms": _percentile(idle, 99),
        "query_p50_during_adds_ms": _percentile(busy, 50),
        "query_p99_during_adds_ms": _percentile(busy, 99),
        "adds_during_queries": streamed,
        "write_lock_p50_ms": _percentile(held, 50) if held else None,
        "write_lock_p99_ms": _percentile(held, 99) if held else None,
        "build_s": round(build_s, 1),
        "adds": args.adds,
        "queries": args.queries,
        "dim": args.dim,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="gallery sizes (1000000 on request)")
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--adds", type=int, default=200, help="single adds timed per size")
    parser.add_argument("--queries", type=int, default=100, help="queries per latency figure")
    parser.add_argument("--rate", type=float, default=20.0, help="adds per second during queries")
    parser.add_argument("--folder", type=Path, default=None, help="where to build (default: tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the galleries afterwards")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args(argv)
    try:
        args.size_list = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes: comma-separated integers expected, got {args.sizes!r}")
    if not args.size_list or min(args.size_list) < 100:
        parser.error("--sizes: every size must be >= 100")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO, stream=sys.stderr)
    root = args.folder or Path(tempfile.mkdtemp(prefix="gallery-writes-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        results = {str(size): measure(size, args, root) for size in args.size_list}
    finally:
        if args.folder is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        sys.stdout.write(json.dumps(results) + "\n")
    else:
        for size, figures in results.items():
            log.info("%s: %s", size, json.dumps(figures))
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
