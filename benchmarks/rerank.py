"""k-reciprocal re-ranking of the shortlist: what it does to R1/mAP, and what it costs a query.

Usage::

    # accuracy: a checkpoint on a dataset's test protocol (both directions), plain vs re-ranked
    python benchmarks/rerank.py accuracy --checkpoint .demo/run/model.safetensors \\
        --data-root .demo/data --format hitsz-vcm --shortlists 50,100
    # latency: the server's refine step (search + re-rank the top-100) on a synthetic gallery
    python benchmarks/rerank.py latency --sizes 10000,100000 --dim 512

``accuracy`` encodes every test tracklet once (``evaluate_model``) and scores the same features
with and without ``vvireid.indexer.rerank.rerank_distances``; it also times the re-ranking per
query. ``latency`` builds a flat ``GalleryIndex`` of clustered random vectors and times what a
server query does after encoding: ``GalleryIndex.search`` then ``refine_hits`` (the function
``QueryEngine`` calls), with ``rerank`` off and on; median and p95 over ``--queries`` queries.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    from vvireid.indexer.rerank import RerankParams, rerank_distances
    from vvireid.indexer.sources import load_dataset
    from vvireid.indexer.sources.splits import DIRECTIONS
    from vvireid.model.checkpoint import load_checkpoint
    from vvireid.training.evaluation import distance_matrix, evaluate
    from vvireid.training.report import encode_tracklets

    model = load_checkpoint(args.checkpoint)
    splits = load_dataset(args.format, args.data_root)
    unique: dict[Any, int] = {}
    for direction in DIRECTIONS:
        for t in [*splits.query.get(direction, []), *splits.gallery.get(direction, [])]:
            unique.setdefault(t, len(unique))
    started = time.perf_counter()
    feats = encode_tracklets(model, list(unique), model.preprocess, device=torch.device("cpu"),
                             batch_size=args.batch_size, num_workers=args.workers)
    out: dict[str, Any] = {"encode_s": round(time.perf_counter() - started, 1)}
    for direction in DIRECTIONS:
        query, gallery = splits.query.get(direction, []), splits.gallery.get(direction, [])
        if not query or not gallery:
            continue
        q, g = feats[[unique[t] for t in query]], feats[[unique[t] for t in gallery]]
        labels = ([t.pid for t in query], [t.pid for t in gallery],
                  [t.camid for t in query], [t.camid for t in gallery])
        plain = evaluate(distance_matrix(q, g, model.similarity), *labels,
                         filter_same_camera=splits.filter_same_camera)
        row: dict[str, Any] = {"num_queries": len(query), "num_gallery": len(gallery),
                               "plain": _metrics(plain)}
        for shortlist in args.shortlists:
            t0 = time.perf_counter()
            dist = rerank_distances(q, g, RerankParams(shortlist=shortlist))
            per_query_ms = (time.perf_counter() - t0) * 1000 / len(q)
            result = evaluate(dist, *labels, filter_same_camera=splits.filter_same_camera)
            row[f"rerank_{shortlist}"] = {**_metrics(result), "ms_per_query": round(per_query_ms, 2)}
        out[direction] = row
    return out


def _metrics(result: Any) -> dict[str, float]:
    return {"R1": round(100 * float(result.cmc[0]), 2), "mAP": round(100 * result.mAP, 2)}


def latency(args: argparse.Namespace) -> dict[str, Any]:
    from vvireid.indexer.api import SearchOptions, refine_hits
    from vvireid.indexer.store import GalleryIndex, GalleryItem
    from vvireid.model.types import Modality

    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for size in args.sizes:
        centres = rng.normal(size=(size // 8 + 1, args.dim)).astype(np.float32)
        vectors = centres[np.arange(size) // 8] + 0.5 * rng.normal(size=(size, args.dim)).astype(
            np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        with tempfile.TemporaryDirectory() as tmp:
            index = GalleryIndex.create(Path(tmp) / "g", dim=args.dim, model_fingerprint="bench",
                                        similarity="cosine", device="cpu")
            items = [GalleryItem(f"t{i}", Modality(i % 2), i % 4, pid=i // 8) for i in range(size)]
            for start in range(0, size, 50_000):
                index.add(items[start:start + 50_000], vectors[start:start + 50_000])
            index.save()
            queries = vectors[rng.choice(size, args.queries, replace=False)]
            row = {}
            for rerank in (False, True):
                options = SearchOptions(top_k=10, rerank=rerank)
                times = []
                for query in queries:
                    t0 = time.perf_counter()
                    hits = index.search(query, options.fetch_k, modality=Modality.VISIBLE)[0]
                    refine_hits(index, query, hits, options, None)
                    times.append((time.perf_counter() - t0) * 1000)
                times.sort()
                row["rerank" if rerank else "plain"] = {
                    "p50_ms": round(statistics.median(times), 2),
                    "p95_ms": round(times[int(0.95 * (len(times) - 1))], 2),
                }
            index.close()
        out[f"{size}x{args.dim}"] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    acc = commands.add_parser("accuracy")
    acc.add_argument("--checkpoint", required=True)
    acc.add_argument("--data-root", required=True)
    acc.add_argument("--format", default="hitsz-vcm")
    acc.add_argument("--shortlists", default="100",
                     type=lambda v: [int(x) for x in v.split(",")])
    acc.add_argument("--batch-size", type=int, default=32)
    acc.add_argument("--workers", type=int, default=0)
    lat = commands.add_parser("latency")
    lat.add_argument("--sizes", default="10000", type=lambda v: [int(x) for x in v.split(",")])
    lat.add_argument("--dim", type=int, default=512)
    lat.add_argument("--queries", type=int, default=200)
    lat.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(getattr(args, "threads", 1))
    result = accuracy(args) if args.command == "accuracy" else latency(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
