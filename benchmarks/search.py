"""Gallery search and indexing speed: latency, recall of the approximate indexes, BLAS threshold.

Usage::

    python benchmarks/search.py                       # 100k x 1536, flat + ivf, tiny encoder
    python benchmarks/search.py --index-types flat,ivf,ivfpq --sizes 100000,1000000
    python benchmarks/search.py --index-types flat --encode-model full   # ViT-B/16 288x144 encoder
    python benchmarks/search.py --backend milvus --sizes 20000 --index-types flat --encode-model none

What it measures, through the product classes (``GalleryIndex``, ``TrackletEncoder``):

* search latency for 1 and 64 queries, k = 100, without a filter and with the cross-modal
  (gallery modality) filter the server applies by default; median of ``--repeats`` runs;
* build cost (train + add) per index type, and 10-recall@10 of ivf / ivfpq against the exact
  flat results (on clustered vectors: ``--views`` noisy views per identity, cos(view, centre)
  about 0.86, so each identity forms a cluster; on uniformly random vectors IVF recall is
  meaningless);
* flat search with faiss 1.15's default ``distance_compute_blas_threshold`` (128000) against the
  value the index sets (20), for 16 and 64 queries;
* with ``--backend milvus``: the same searches through ``MilvusGallery`` on a Milvus Lite file
  (``--milvus-uri``, default a temporary ``.db``), plus the median single-row insert (no flush);
* indexing throughput (tracklets/s) of ``TrackletEncoder.encode_tracklets`` on synthetic JPEG
  tracklets, with the tiny test model (``--encode-model tiny``, 64x32, T=4) or a randomly
  initialised ViT-B/16 at 288x144, T=6 (``full``; same compute as a trained one).

The vectors are random: the figures are costs, not retrieval quality on real features. On a shared
machine, OpenMP teams of 2 threads lose badly to other processes (spin-waiting); compare with
``--threads 1``. 1M x 1536 needs about 13 GB of RAM for the flat index.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from vvireid.indexer.backend import DEFAULT_BLAS_THRESHOLD, configure_faiss
from vvireid.indexer.gallery import BackendOptions, create_gallery
from vvireid.indexer.store import GalleryIndex, GalleryItem
from vvireid.model.types import Modality


def machine_info() -> str:
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = faiss.get_num_gpus()
    return (
        f"{platform.platform()} | {cpu} | {os.cpu_count()} cores | faiss {faiss.__version__} "
        f"({faiss.omp_get_max_threads()} OpenMP threads, {gpus} GPU) | numpy {np.__version__} | "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads, "
        f"cuda={'yes' if torch.cuda.is_available() else 'no'})"
    )


def clustered(
    n: int, dim: int, views: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors, ``views`` noisy views per identity; returns (vectors, centres)."""
    centres = rng.standard_normal((max(1, n // views), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    block = 50_000
    for start in range(0, n, block):
        stop = min(n, start + block)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * (0.59 / np.sqrt(dim))
        out[start:stop] = centres[np.arange(start, stop) // views % len(centres)] + noise
        out[start:stop] /= np.linalg.norm(out[start:stop], axis=1, keepdims=True)
    return out, centres


def queries_for(centres: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    dim = centres.shape[1]
    picked = centres[rng.choice(len(centres), count, replace=False)]
    q = picked + rng.standard_normal(picked.shape, dtype=np.float32) * (0.59 / np.sqrt(dim))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def median_ms(fn: Any, repeats: int) -> float:
    fn()  # warm-up (page faults, lazy selector construction)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def latency(
    index: GalleryIndex, queries: np.ndarray, args: argparse.Namespace, modality: Modality | None
) -> str:
    """Median ms of one ``GalleryIndex.search`` call (what the server pays per micro-batch)."""
    return (
        f"{median_ms(lambda: index.search(queries, args.k, modality=modality), args.repeats):.1f}"
    )


def build(
    kind: str, vectors: np.ndarray, folder: Path, args: argparse.Namespace
) -> tuple[Any, float]:
    """A gallery of ``vectors`` on the chosen backend; returns it and the seconds to add them."""
    items = [GalleryItem(f"g{i}", Modality(i % 2), i % 6) for i in range(len(vectors))]
    options = BackendOptions()
    if args.backend == "milvus":
        options = BackendOptions("milvus", args.milvus_uri or str(folder / "bench.db"))
    index = create_gallery(
        folder / f"bench_{kind}",
        options,
        dim=vectors.shape[1],
        model_fingerprint="bench",
        similarity="cosine",
        index_type=kind,
        overwrite=True,
        device="cpu",
    )
    start = time.perf_counter()
    for first in range(0, len(items), 5_000):
        index.add(items[first : first + 5_000], vectors[first : first + 5_000])
    if args.backend == "milvus":
        index.save()  # flush: sealed segments, as a long-running collection has them
    return index, time.perf_counter() - start


def insert_ms(index: Any, dim: int, repeats: int) -> float:
    """Median ms of adding one row (Milvus: an insert, durable in its write-ahead log)."""
    rng = np.random.default_rng(7)
    counter = iter(range(10**9))

    def one() -> None:
        vector = rng.standard_normal((1, dim)).astype(np.float32)
        index.add([GalleryItem(f"new{next(counter)}", Modality.VISIBLE, 0)], vector)

    return median_ms(one, repeats)


def top_ids(index: GalleryIndex, queries: np.ndarray, k: int) -> list[set[str]]:
    return [{h.tracklet_id for h in row} for row in index.search(queries, k)]


def bench_size(
    n: int, args: argparse.Namespace, rows: list[list[str]], blas_rows: list[list[str]]
) -> None:
    rng = np.random.default_rng(n)
    start = time.perf_counter()
    vectors, centres = clustered(n, args.dim, args.views, rng)
    print(
        f"# {n:,} x {args.dim} vectors generated in {time.perf_counter() - start:.1f} s", flush=True
    )
    queries = queries_for(centres, args.queries, rng)
    truth: list[set[str]] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.index_types:
            index, build_s = build(kind, vectors, Path(tmp), args)
            cells = [f"{n:,}", f"{args.backend} {kind}", f"{build_s:.1f}"]
            for nq in (1, args.queries):
                cells.append(latency(index, queries[:nq], args, None))
                cells.append(latency(index, queries[:nq], args, Modality.VISIBLE))
            found = top_ids(index, queries, 10)
            if args.backend == "milvus":
                exact = [
                    {f"g{i}" for i in np.argsort(-(vectors @ q))[:10]} for q in queries
                ]
                recall = np.mean([len(a & b) / 10 for a, b in zip(exact, found, strict=True)])
                cells.append(f"{recall:.3f}; 1-row insert {insert_ms(index, args.dim, 20):.1f} ms")
            elif kind == "flat":
                truth = found
                cells.append("1.000 (exact)")
                blas_rows += blas_comparison(index, queries, n, args)
            elif truth is not None:
                recall = np.mean([len(a & b) / 10 for a, b in zip(truth, found, strict=True)])
                cells.append(
                    f"{recall:.3f} (nprobe {index.nprobe}/{index.stats()['index_params']['nlist']})"
                )
            else:
                cells.append("(no flat run)")
            rows.append(cells)
            print("  ".join(cells), flush=True)


def blas_comparison(
    index: GalleryIndex, queries: np.ndarray, n: int, args: argparse.Namespace
) -> list[list[str]]:
    out = []
    for nq in (16, args.queries):
        cells = [f"{n:,}", str(nq)]
        for threshold in (128000, DEFAULT_BLAS_THRESHOLD):
            configure_faiss(threshold)
            cells.append(latency(index, queries[:nq], args, None))
            cells.append(latency(index, queries[:nq], args, Modality.INFRARED))
        configure_faiss()
        out.append(cells)
    return out


def bench_encode(args: argparse.Namespace) -> str:
    import torch
    from PIL import Image
    from vvireid.indexer.encode import TrackletEncoder
    from vvireid.model.backbone import TINY_MODEL, register_tiny_configs
    from vvireid.model.config import ModelConfig
    from vvireid.model.factory import create_model
    from vvireid.model.types import Tracklet

    register_tiny_configs()
    if args.encode_model == "tiny":
        model = create_model(
            ModelConfig("baseline", 10, backbone=TINY_MODEL, image_size=(64, 32), seq_len=4),
        )
        label = "tiny test model (vvireid-tiny, 64x32, T=4)"
    else:
        model = create_model(
            ModelConfig("baseline", 10, backbone="ViT-B-16", image_size=(288, 144), seq_len=6),
        )
        label = "ViT-B/16 baseline, random init (288x144, T=6)"
    model.fingerprint = "bench"
    encoder = TrackletEncoder(model, batch_size=args.batch_size)
    rng = np.random.default_rng(0)
    tracklets = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in range(args.encode_tracklets):
            frames = []
            for f in range(args.encode_frames):
                path = Path(tmp) / f"{t}-{f}.jpg"
                Image.fromarray(rng.integers(0, 255, (256, 128, 3), dtype=np.uint8)).save(
                    path, quality=90
                )
                frames.append(str(path))
            tracklets.append(Tracklet(f"t{t}", tuple(frames), Modality(t % 2), t % 4))
        list(encoder.encode_tracklets(tracklets[: args.batch_size]))  # warm-up
        start = time.perf_counter()
        encoded = sum(len(c.tracklets) for c in encoder.encode_tracklets(tracklets))
        seconds = time.perf_counter() - start
    return (
        f"{encoded / seconds:.1f} tracklets/s ({encoded} tracklets of {args.encode_frames} "
        f"256x128 JPEG "
        f"frames, {label}, device {encoder.device}, {torch.get_num_threads()} torch threads, "
        f"batch {args.batch_size}, thumbnails on)"
    )


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument(
        "--backend", choices=("faiss", "milvus"), default="faiss", help="gallery backend"
    )
    parser.add_argument(
        "--milvus-uri", default=None, help="milvus: a .db path (default: a temporary file)"
    )
    parser.add_argument("--sizes", default="100000", help="comma-separated gallery sizes")
    parser.add_argument(
        "--index-types",
        default="flat,ivf",
        help="comma-separated; ivfpq adds ~6 min of training at 100k on 2 cores",
    )
    parser.add_argument("--queries", type=int, default=64, help="batch size of the batched search")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--views", type=int, default=50, help="vectors per synthetic identity")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--encode-model", choices=("tiny", "full", "none"), default="tiny")
    parser.add_argument("--encode-tracklets", type=int, default=64)
    parser.add_argument("--encode-frames", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--threads", type=int, default=0, help="FAISS OpenMP threads (0: library default)"
    )
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    args.index_types = [t for t in args.index_types.split(",") if t]
    print(machine_info(), flush=True)
    print(f"load average at start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    rows: list[list[str]] = []
    blas_rows: list[list[str]] = []
    for size in (int(s) for s in args.sizes.split(",")):
        bench_size(size, args, rows, blas_rows)
    nq = args.queries
    print_table(
        f"Search latency, k={args.k}, median ms (cross = gallery modality filter), dim {args.dim}",
        [
            "gallery",
            "index",
            "build s",
            "1q",
            "1q cross",
            f"{nq}q",
            f"{nq}q cross",
            "10-recall@10 vs flat",
        ],
        rows,
    )
    if blas_rows:
        print_table(
            f"Flat search vs distance_compute_blas_threshold, k={args.k}, median ms",
            [
                "gallery",
                "queries",
                "thr 128000",
                "thr 128000 cross",
                f"thr {DEFAULT_BLAS_THRESHOLD}",
                f"thr {DEFAULT_BLAS_THRESHOLD} cross",
            ],
            blas_rows,
        )
    if args.encode_model != "none":
        print(f"\nIndexing throughput: {bench_encode(args)}")
    print(f"load average at end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
