"""Load test of the query server: N concurrent clients x M requests on the loopback interface.

Usage::

    python benchmarks/load.py                                  # tiny synthetic model + gallery
    python benchmarks/load.py --checkpoint m.safetensors --index gallery/ --device cuda
    python benchmarks/load.py --clients 32 --requests 20 --frames 6 --size 288x144
    python benchmarks/load.py --device cuda --method vld --backbone ViT-B-16 --gallery 100000

It starts ``python -m vvireid.server`` itself on 127.0.0.1 (a free port) and stops it at the end; nothing
else is contacted. Without ``--checkpoint``/``--index`` it builds, in a temporary folder, a
random-weight ``vvireid-tiny`` checkpoint (input 288x144, 6 frames) and a gallery of
``--gallery`` random unit vectors (half visible, half infrared): realistic decode and search
costs, a tiny model. Each request uploads ``--frames`` JPEG frames of ``--size`` pixels.

Printed: throughput, client-side latency p50/p95/p99, errors, the server's own timings and its
overhead beyond the model and the search: ``total - encode - search`` per response (decode,
preprocessing, queueing, multipart parsing, HTTP). Target: under 15 ms at p50.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def build_synthetic(
    folder: Path,
    gallery: int,
    size: tuple[int, int],
    seq_len: int,
    method: str = "baseline",
    backbone: str = "vvireid-tiny",
) -> tuple:
    """A random-weight checkpoint and a random-vector gallery index made for it.

    The default tiny backbone measures the server's own overhead; ``ViT-B-16`` (random weights,
    same cost as trained ones) measures what a user's GPU server does end to end.
    """
    from vvireid.indexer.store import GalleryIndex, GalleryItem
    from vvireid.model.backbone import register_tiny_configs
    from vvireid.model.checkpoint import load_checkpoint, save_checkpoint
    from vvireid.model.config import ModelConfig
    from vvireid.model.factory import create_model
    from vvireid.model.types import Modality

    register_tiny_configs()
    checkpoint = folder / "model.safetensors"
    save_checkpoint(checkpoint, create_model(
        ModelConfig(
            method, num_classes=8, backbone=backbone, image_size=size, seq_len=seq_len,
            num_cameras=4 if method == "xreid" else 0,
        ),
    ))
    model = load_checkpoint(checkpoint)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((gallery, model.embed_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = [
        GalleryItem(f"t{i:06d}", Modality(i % 2), camid=int(rng.integers(0, 4)), pid=i // 4)
        for i in range(gallery)
    ]
    index = GalleryIndex.create(folder / "index", dim=model.embed_dim,
                                model_fingerprint=str(model.fingerprint),
                                similarity=model.similarity, model_config=model.config.to_dict())
    index.add(items, vectors)
    index.save()
    return checkpoint, folder / "index"


def jpeg_frames(count: int, frames: int, size: tuple[int, int], seed: int = 0) -> list[list]:
    """``count`` request payloads of ``frames`` JPEGs each (an httpx ``files`` list)."""
    rng = np.random.default_rng(seed)
    payloads = []
    for r in range(count):
        base = rng.integers(0, 256, size=(8, 4, 3))
        files = []
        for f in range(frames):
            blocks = np.kron(base, np.ones((size[0] // 8, size[1] // 4, 1)))
            pixels = np.clip(blocks + rng.normal(0, 10, blocks.shape), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
            files.append(("frames", (f"r{r}-{f:03d}.jpg", buffer.getvalue(), "image/jpeg")))
        payloads.append(files)
    return payloads


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, checkpoint: Path, index: Path, port: int, log):
    command = [
        sys.executable, "-m", "vvireid.server", "--checkpoint", str(checkpoint), "--index", str(index),
        "--host", "127.0.0.1", "--port", str(port), "--device", args.device,
        "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
        "--queue-size", str(args.queue_size), "--log-level", "warning",
    ]
    if args.torch_threads:
        command += ["--torch-threads", str(args.torch_threads)]
    if args.compile is not None:
        command += ["--compile" if args.compile else "--no-compile"]
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(process, base, args.start_timeout, log)
    return process, base


def wait_until_ready(process: subprocess.Popen, base: str, timeout: float, log) -> None:
    """Poll ``/readyz`` until it answers 200; exit with the server's log tail if it dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise SystemExit(f"server exited with {process.returncode}:\n{log.read()[-3000:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("server not ready in time")


def run_clients(base: str, args: argparse.Namespace, payloads: list[list]) -> tuple[list, float]:
    """Every client sends ``args.requests`` queries; returns per-request records and wall time."""
    barrier = threading.Barrier(args.clients + 1)
    form = {"modality": "infrared", "top_k": str(args.top_k)}

    def client(n: int) -> list[dict]:
        records = []
        with httpx.Client(base_url=base, timeout=120) as http:
            http.post("/v1/query", files=payloads[n % len(payloads)], data=form)  # warm-up
            barrier.wait()
            for i in range(args.requests):
                files = payloads[(n + i) % len(payloads)]
                started = time.perf_counter()
                try:
                    response = http.post("/v1/query", files=files, data=form)
                    status = response.status_code
                    body = response.json() if status == 200 else None
                except httpx.HTTPError:
                    status, body = -1, None
                records.append({"latency": time.perf_counter() - started, "status": status,
                                "timings": body["timings_ms"] if body else None,
                                "batch": body["query"]["batch_size"] if body else None})
        return records

    with ThreadPoolExecutor(args.clients) as pool:
        futures = [pool.submit(client, n) for n in range(args.clients)]
        barrier.wait()
        started = time.perf_counter()
        records = [r for f in futures for r in f.result()]
        wall = time.perf_counter() - started
    return records, wall


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values)
    return {f"p{p}": round(float(np.percentile(array, p)), 2) for p in (50, 95, 99)}


def summarise(records: list[dict], wall: float, metrics: str, args: argparse.Namespace) -> dict:
    ok = [r for r in records if r["status"] == 200]
    timings = [r["timings"] for r in ok]
    batches = re.search(r"^vvireid_batch_size_sum (\S+)$", metrics, re.M)
    count = re.search(r"^vvireid_batch_size_count (\S+)$", metrics, re.M)
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "statuses": sorted({r["status"] for r in records}),
        "throughput_rps": round(len(ok) / wall, 1),
        "latency_ms": percentiles([r["latency"] * 1000 for r in ok]),
        "server_total_ms": percentiles([t["total"] for t in timings]),
        "decode_ms": percentiles([t["decode"] for t in timings]),
        "queue_ms": percentiles([t["queue"] for t in timings]),
        "encode_ms": percentiles([t["encode"] for t in timings]),
        "search_ms": percentiles([t["search"] for t in timings]),
        "overhead_ms (total - encode - search)": percentiles(
            [t["total"] - t["encode"] - t["search"] for t in timings]
        ),
        "mean_batch_size": round(float(batches.group(1)) / max(1.0, float(count.group(1))), 2)
        if batches and count else None,
        "setup": {"clients": args.clients, "requests_per_client": args.requests,
                  "frames": args.frames, "size": args.size, "device": args.device,
                  "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                  "model": str(args.checkpoint) if args.checkpoint else
                  f"{args.method}/{args.backbone} (random weights)", "gallery": args.gallery,
                  "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine()},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="default: a synthetic tiny model")
    parser.add_argument("--index", type=Path, help="default: a synthetic gallery")
    parser.add_argument("--gallery", type=int, default=10_000, help="synthetic gallery size")
    parser.add_argument("--method", default="baseline", choices=("baseline", "vld", "xreid"),
                        help="synthetic model's method")
    parser.add_argument("--backbone", default="vvireid-tiny",
                        help="synthetic model's backbone (ViT-B-16 for the real cost)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="the server's --compile (default: the server's own choice)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=20, help="per client")
    parser.add_argument("--frames", type=int, default=6, help="frames per request")
    parser.add_argument("--size", default="288x144", help="frame size HxW")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--queue-size", type=int, default=256)
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--start-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.clients > 512:
        parser.error("need 1 <= clients <= 512 and requests >= 1")
    if (args.checkpoint is None) != (args.index is None):
        parser.error("give both --checkpoint and --index, or neither (synthetic)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="vvireid-load-") as tmp:
        if args.checkpoint is None:
            checkpoint, index = build_synthetic(
                Path(tmp), args.gallery, size, args.frames, args.method, args.backbone
            )
        else:
            checkpoint, index = args.checkpoint, args.index
        payloads = jpeg_frames(min(args.clients, 16), args.frames, size)
        with open(Path(tmp) / "server.log", "w+") as log:
            process, base = start_server(args, checkpoint, index, free_port(), log)
            try:
                records, wall = run_clients(base, args, payloads)
                metrics = httpx.get(f"{base}/metrics", timeout=10).text
            finally:
                process.terminate()
                process.wait(30)
    print(json.dumps(summarise(records, wall, metrics, args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
