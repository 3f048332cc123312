"""Throughput of ``model.encode`` per method, and VLD's cost over the plain CLIP baseline.

Usage::

    python benchmarks/encode.py [--method baseline --method vld] [--backbone ViT-B-16]
        [--seq-len 6] [--batch 8] [--iters 10] [--device auto|cpu|cuda] [--dtype fp32|bf16]
        [--size 288x144] [--no-flops] [--json]

Models are built with random weights (speed does not depend on them). Every timed repeat runs
each method once, in turn, so that drift in machine load hits all methods alike; the table
reports medians, and the cost ratio is the median of the per-repeat ratios. The VLD paper claims
+0.12 GMACs per frame (+0.9%) over the baseline; our target is that VLD's encode costs at most 3%
more than the baseline's.

``--dtype bf16``: on CPU the weights are cast to bf16; on CUDA encode runs under bf16 autocast.
Either way the cosine between the bf16 and the fp32 features of the same clips is reported
(mean and minimum over the batch). ``--flops`` (default on) counts the FLOPs of one tracklet with
``torch.utils.flop_counter`` and reports GMACs per frame (attention products included).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from vvireid.model.base import ReIDModel
from vvireid.model.config import ModelConfig
from vvireid.model.factory import available_methods, create_model

COST_TARGET = 1.03


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 288x144, got {text!r}") from None
    return height, width


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--method",
        action="append",
        choices=available_methods(),
        help="repeatable; default: baseline and vld",
    )
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--seq-len", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8, help="tracklets per encode call")
    parser.add_argument("--iters", type=int, default=10, help="timed repeats per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per method")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--size", type=parse_size, default=(288, 144), help="HxW, e.g. 288x144")
    parser.add_argument("--num-classes", type=int, default=500)
    parser.add_argument("--num-cameras", type=int, default=6, help="for methods with camera input")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args(argv)
    args.method = args.method or ["baseline", "vld"]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def build(method: str, args: argparse.Namespace) -> ReIDModel:
    model = create_model(
        ModelConfig(
            method, args.num_classes, backbone=args.backbone, image_size=args.size,
            seq_len=args.seq_len, num_cameras=args.num_cameras,
        ),
    )
    return model.to(args.device).eval()


@contextlib.contextmanager
def precision(args: argparse.Namespace) -> Iterator[None]:
    """bf16 autocast on CUDA for ``--dtype bf16``; nothing otherwise (CPU bf16 = bf16 weights)."""
    if args.dtype == "bf16" and args.device == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gmacs_per_frame(model: ReIDModel, clips: torch.Tensor, camids: torch.Tensor | None) -> float:
    """Multiply-accumulates of the encode path of one tracklet, per frame.

    Runs ``_encode`` with autograd on: under ``no_grad`` nn.MultiheadAttention takes a fused fast
    path the FLOP counter cannot see, which would drop every attention layer from the count.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    model.eval()
    with counter, torch.enable_grad():
        model._encode(clips[:1], None if camids is None else camids[:1])
    return counter.get_total_flops() / 2 / clips.shape[1] / 1e9


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    height, width = args.size
    clips = torch.randn(args.batch, args.seq_len, 3, height, width, device=args.device)
    camids = (
        torch.arange(args.batch, device=args.device) % args.num_cameras
        if args.num_cameras
        else None
    )
    models = {m: build(m, args) for m in args.method}
    timed = models
    input_clips = clips
    if args.dtype == "bf16" and args.device == "cpu":
        timed = {m: copy.deepcopy(model).to(torch.bfloat16) for m, model in models.items()}
        input_clips = clips.to(torch.bfloat16)

    results: dict[str, dict[str, Any]] = {}
    for method, model in timed.items():
        params = sum(p.numel() for p in models[method].parameters() if p.requires_grad)
        results[method] = {"embed_dim": model.embed_dim, "trainable_m": params / 1e6, "times": []}
        with precision(args):
            for _ in range(args.warmup):
                model.encode(input_clips, camids)
        if args.dtype == "bf16":
            with torch.no_grad(), precision(args):
                low = model.encode(input_clips, camids).float()
            reference = models[method].encode(clips, camids).float()
            cosine = F.cosine_similarity(low, reference, dim=1)
            results[method]["cos_bf16_fp32_mean"] = cosine.mean().item()
            results[method]["cos_bf16_fp32_min"] = cosine.min().item()
        if args.flops:
            results[method]["gmacs_per_frame"] = gmacs_per_frame(models[method], clips, camids)

    for _ in range(args.iters):  # interleaved: each repeat runs every method once
        for method, model in timed.items():
            synchronize(args.device)
            start = time.perf_counter()
            with precision(args):
                model.encode(input_clips, camids)
            synchronize(args.device)
            results[method]["times"].append(time.perf_counter() - start)

    for entry in results.values():
        entry["median_s"] = statistics.median(entry["times"])
        entry["tracklets_per_s"] = args.batch / entry["median_s"]
    if "baseline" in results:
        # Median of the per-repeat ratios: each pair of timings ran back to back, so slow drift in
        # machine load cancels out (a ratio of the two medians is also reported).
        base = results["baseline"]["times"]
        for entry in results.values():
            pairs = [t / b for t, b in zip(entry["times"], base, strict=True)]
            entry["cost_vs_baseline"] = statistics.median(pairs)
            entry["cost_of_medians"] = entry["median_s"] / results["baseline"]["median_s"]
    return {
        "config": {
            "backbone": args.backbone,
            "seq_len": args.seq_len,
            "batch": args.batch,
            "iters": args.iters,
            "device": args.device,
            "dtype": args.dtype,
            "size": f"{height}x{width}",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        },
        "methods": results,
    }


def print_table(report: dict[str, Any]) -> None:
    cfg = report["config"]
    print(
        f"encode benchmark: {cfg['backbone']} {cfg['size']}, T={cfg['seq_len']}, batch "
        f"{cfg['batch']} tracklets, {cfg['iters']} interleaved repeats, {cfg['device']} "
        f"{cfg['dtype']}, torch {cfg['torch']}, {cfg['threads']} threads"
        + (f", {cfg['gpu']}" if cfg["gpu"] else "")
    )
    header = (
        f"{'method':<10} {'dim':>5} {'trainable M':>11} {'GMAC/frame':>10} {'ms/batch':>9} "
        f"{'tracklets/s':>11} {'cost x':>7} {'cos bf16 (mean/min)':>20}"
    )
    print(header)
    print("-" * len(header))
    for method, r in report["methods"].items():
        gmacs = f"{r['gmacs_per_frame']:.3f}" if "gmacs_per_frame" in r else "-"
        cost = f"{r['cost_vs_baseline']:.3f}" if "cost_vs_baseline" in r else "-"
        cos = (
            f"{r['cos_bf16_fp32_mean']:.5f}/{r['cos_bf16_fp32_min']:.5f}"
            if "cos_bf16_fp32_mean" in r
            else "-"
        )
        print(
            f"{method:<10} {r['embed_dim']:>5} {r['trainable_m']:>11.2f} {gmacs:>10} "
            f"{1000 * r['median_s']:>9.1f} {r['tracklets_per_s']:>11.2f} {cost:>7} {cos:>20}"
        )
    methods = report["methods"]
    if "vld" in methods and "baseline" in methods:
        ratio = methods["vld"]["cost_vs_baseline"]
        verdict = "within" if ratio <= COST_TARGET else "OVER"
        line = (
            f"VLD/baseline encode cost ratio: {ratio:.3f} ({verdict} the {COST_TARGET:.2f} target)"
        )
        if "gmacs_per_frame" in methods["vld"]:
            extra = methods["vld"]["gmacs_per_frame"] - methods["baseline"]["gmacs_per_frame"]
            line += f"; +{extra:.3f} GMACs per frame"
        print(line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print_table(report)
    if args.json:
        for entry in report["methods"].values():
            entry.pop("times")
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
