"""Hostile clients against the query server with its DEFAULT settings, on the loopback interface.

Usage::

    python benchmarks/hostile.py                 # all scenarios, JSON summary on stdout
    python benchmarks/hostile.py --clients 128 --bombs 12 --slow 200

It starts ``python -m vvireid.server`` itself on 127.0.0.1 (a tiny synthetic model and gallery,
as ``benchmarks/load.py`` builds them) and measures, from outside the process:

- ``bombs``: ``--bombs`` concurrent requests of 64 blank 4096x4096 PNGs (1 MB each on the
  wire, 1 G pixels declared): status, time to reject, server RSS before / peak / 2 s after.
- ``decoded``: the same burst shape against a second server whose pixel budget is raised so the
  frames are really decoded (``--decoded-frames`` per request): peak and settled RSS.
- ``overload``: ``--clients`` concurrent queries of 6 JPEG frames: statuses, latency
  p50/p99/max, Retry-After on every 503, and the latency of one query right afterwards.
- ``slow_headers``: ``--slow`` connections that never finish their headers: how many the server
  has closed ``header_timeout_s`` + 2 s later.
- ``write_without_key``: a gallery write declaring a 60 MB body, headers only: time to the answer.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import (  # noqa: E402
    build_synthetic,
    free_port,
    jpeg_frames,
    percentiles,
    wait_until_ready,
)

REPO = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


class RssSampler:
    """Samples a process's RSS every 20 ms in a thread; ``peak`` is the largest sample."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def start_server(checkpoint: Path, index: Path, port: int, log, *extra: str):
    command = [sys.executable, "-m", "vvireid.server", "--checkpoint", str(checkpoint),
               "--index", str(index), "--port", str(port), "--device", "cpu",
               "--log-level", "warning", *extra]
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(process, base, 300, log)
    return process, base


def blank_png(size: int = 4096) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size)).save(buffer, "PNG")
    return buffer.getvalue()


def burst(base: str, pid: int, requests: int, frames: int) -> dict:
    """``requests`` concurrent uploads of ``frames`` blank 4096x4096 PNGs; RSS around them."""
    png = blank_png()
    files = [("frames", (f"{i}.png", png, "image/png")) for i in range(frames)]
    with httpx.Client(base_url=base, timeout=120) as http:
        http.post("/v1/query", files=jpeg_frames(1, 6, (288, 144))[0], data={"modality": "ir"})
        time.sleep(0.5)
        idle = rss_mb(pid)

        def one(_: int) -> tuple[int, float]:
            started = time.perf_counter()
            response = http.post("/v1/query", files=files, data={"modality": "ir"})
            return response.status_code, time.perf_counter() - started

        with RssSampler(pid) as sampler, ThreadPoolExecutor(requests) as pool:
            results = list(pool.map(one, range(requests)))
        time.sleep(2.0)
        after = rss_mb(pid)
    return {
        "requests": requests, "frames_each": frames,
        "statuses": sorted({status for status, _ in results}),
        "seconds": percentiles([s for _, s in results]),
        "rss_idle_mb": round(idle, 1), "rss_peak_mb": round(sampler.peak, 1),
        "rss_after_2s_mb": round(after, 1),
        "peak_rise_mb": round(sampler.peak - idle, 1),
        "after_vs_idle": round(after / idle, 3),
    }


def overload(base: str, clients: int) -> dict:
    payload = jpeg_frames(1, 6, (288, 144))[0]
    barrier = threading.Barrier(clients)

    def one(_: int) -> tuple[int, float, str | None]:
        with httpx.Client(base_url=base, timeout=60) as http:
            barrier.wait()
            started = time.perf_counter()
            response = http.post("/v1/query", files=payload, data={"modality": "ir"})
            return (response.status_code, time.perf_counter() - started,
                    response.headers.get("retry-after"))

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    started = time.perf_counter()
    after = httpx.post(base + "/v1/query", files=payload, data={"modality": "ir"}, timeout=60)
    counts: dict[str, int] = {}
    for status, _, _ in results:
        counts[str(status)] = counts.get(str(status), 0) + 1
    return {
        "clients": clients, "statuses": counts,
        "seconds": percentiles([s for _, s, _ in results]),
        "max_s": round(max(s for _, s, _ in results), 3),
        "every_503_has_retry_after": all(r for st, _, r in results if st == 503),
        "next_query": {"status": after.status_code,
                       "seconds": round(time.perf_counter() - started, 3)},
    }


def slow_headers(base: str, count: int, header_timeout_s: float) -> dict:
    host, port = base.rsplit(":", 1)[0].split("//")[1], int(base.rsplit(":", 1)[1])
    socks = []
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=30)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        socks.append(sock)
    time.sleep(header_timeout_s + 2.0)
    closed = 0
    for sock in socks:
        sock.settimeout(0.5)
        try:
            data = sock.recv(4096)
            while data and not data.endswith(b"\n"):
                data += sock.recv(4096)
            closed += 1  # answered (408) and closed, or closed
        except TimeoutError:
            pass
        sock.close()
    return {"connections": count, "closed_after_s": header_timeout_s + 2.0, "closed": closed}


def write_without_key(base: str) -> dict:
    host, port = base.rsplit(":", 1)[0].split("//")[1], int(base.rsplit(":", 1)[1])
    sock = socket.create_connection((host, port), timeout=30)
    started = time.perf_counter()
    sock.sendall(b"POST /v1/gallery HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                 b"boundary=b\r\nContent-Length: 62914560\r\n\r\n")
    first = sock.recv(4096)
    elapsed = time.perf_counter() - started
    sock.close()
    return {"status_line": first.split(b"\r\n")[0].decode(), "seconds": round(elapsed, 4)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bombs", type=int, default=12, help="concurrent 64-PNG requests")
    parser.add_argument("--decoded-frames", type=int, default=8,
                        help="4096x4096 PNGs per request in the decoded burst (0: skip)")
    parser.add_argument("--clients", type=int, default=128, help="overload clients")
    parser.add_argument("--slow", type=int, default=200, help="slow-header connections")
    parser.add_argument("--gallery", type=int, default=10_000)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vvireid.server.settings import default_of

    summary: dict = {}
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "server.log", "w+") as log:
        checkpoint, index = build_synthetic(Path(tmp), args.gallery, (288, 144), 6)
        process, base = start_server(checkpoint, index, free_port(), log)
        try:
            summary["bombs"] = burst(base, process.pid, args.bombs, 64)
            summary["write_without_key"] = write_without_key(base)
            summary["overload"] = overload(base, args.clients)
            summary["slow_headers"] = slow_headers(base, args.slow,
                                                   default_of("header_timeout_s"))
            summary["overload_after_slow"] = overload(base, args.clients)
        finally:
            process.terminate()
            process.wait(30)
        if args.decoded_frames:
            budget = str(args.decoded_frames * 4096 * 4096)
            process, base = start_server(checkpoint, index, free_port(), log,
                                         "--max-request-pixels", budget)
            try:
                summary["decoded"] = burst(base, process.pid, args.bombs, args.decoded_frames)
            finally:
                process.terminate()
                process.wait(30)
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
