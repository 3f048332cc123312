"""Time ``vvireid.training.evaluation.evaluate`` on a 5,000 x 5,000 problem and a per-query reference loop.

Usage: ``python benchmarks/eval_speed.py [--size 5000] [--ref-size 1000] [--repeats 3]``

The reference loop is the straightforward one-query-at-a-time transcription of the official
algorithm (the one ``tests/training/test_evaluation.py`` checks against); it runs on a smaller
problem; the ratio compares both there, and the reference time at full size is estimated by
scaling with the matrix area. Both implementations must agree on the small problem.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from vvireid.training.evaluation import evaluate


def reference_loop(distmat, q_pids, g_pids, q_camids, g_camids, filter_same_camera, max_rank=20):
    """Per-query loop as in the official evaluators; returns (cmc, mAP)."""
    order = np.argsort(distmat, axis=1)
    curves, aps = [], []
    for i in range(distmat.shape[0]):
        match = g_pids[order[i]] == q_pids[i]
        keep = ~(match & (g_camids[order[i]] == q_camids[i])) if filter_same_camera else None
        m = (match[keep] if keep is not None else match).astype(np.int64)
        if not m.any():
            continue
        c = m.cumsum()
        c[c > 1] = 1
        curves.append(c[:max_rank])
        cum = m.cumsum()
        precision = np.array([x / (k + 1.0) for k, x in enumerate(cum)]) * m
        aps.append(precision.sum() / m.sum())
    cmc = np.asarray(curves).astype(np.float32).sum(0) / float(len(curves))
    return cmc, float(np.mean(aps))


def problem(n: int, seed: int, num_ids: int, num_cams: int):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((2 * n, 64))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    distmat = -(feats[:n] @ feats[n:].T)  # float64, like MITML
    return (
        distmat,
        rng.integers(0, num_ids, n),
        rng.integers(0, num_ids, n),
        rng.integers(0, num_cams, n),
        rng.integers(0, num_cams, n),
    )


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--ref-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(
        f"machine: {platform.processor() or platform.machine()}, cpu_count={os.cpu_count()}, "
        f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
        f"cuda={'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}"
    )
    big = problem(args.size, 0, num_ids=500, num_cams=6)
    small = problem(args.ref_size, 1, num_ids=100, num_cams=6)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for flag in (True, False):
        label = "filter_same_camera" if flag else "no camera filter  "
        fast_small = evaluate(*small, filter_same_camera=flag, device="cpu")
        ref_cmc, ref_map = reference_loop(*small, flag)
        assert np.array_equal(fast_small.cmc, ref_cmc) and abs(fast_small.mAP - ref_map) < 1e-12
        ref_t = best_time(lambda flag=flag: reference_loop(*small, flag), 1)
        for device in devices:
            fast_t = best_time(
                lambda flag=flag, device=device: evaluate(
                    *big, filter_same_camera=flag, device=device
                ),
                args.repeats,
            )
            small_t = best_time(
                lambda flag=flag, device=device: evaluate(
                    *small, filter_same_camera=flag, device=device
                ),
                args.repeats,
            )
            print(
                f"{label} device={device:4s}: fast {args.size}x{args.size} {fast_t:.3f} s | "
                f"{args.ref_size}x{args.ref_size}: fast {small_t:.3f} s, reference loop "
                f"{ref_t:.3f} s, ratio {ref_t / small_t:.1f}x (results equal); reference at "
                f"{args.size}x{args.size} est. {ref_t * (args.size / args.ref_size) ** 2:.1f} s"
            )


if __name__ == "__main__":
    main()
