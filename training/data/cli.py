"""``vvireid-train data check|synth``: the data subcommands of the training CLI.

``training/cli.py`` calls :func:`add_data_parser` on its subparsers; each handler takes the parsed
namespace and returns the exit code (0 ok, 1 problems found / bad input). Results are printed as
JSON on stdout; problems are also written one per line to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from vvireid.indexer.sources import DATASETS
from vvireid.training.data.check import check_dataset
from vvireid.training.data.synth import FORMATS, synthesize

log = logging.getLogger(__name__)


def _pair(text: str, separators: str, what: str) -> tuple[int, int]:
    for sep in separators:
        if sep in text:
            first, second = text.split(sep, 1)
            break
    else:
        first = second = text
    try:
        return int(first), int(second)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected integers, got {text!r}") from None


def parse_size(text: str) -> tuple[int, int]:
    """``128x64`` -> (128, 64): height x width."""
    if "x" not in text.lower():
        raise argparse.ArgumentTypeError(f"size: expected HxW such as 128x64, got {text!r}")
    return _pair(text.lower(), "x", "size")


def parse_frames(text: str) -> tuple[int, int]:
    """``12-16`` or ``12,16`` -> (12, 16); ``14`` -> (14, 14)."""
    return _pair(text, "-,:", "frames")


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")


def run_check(args: argparse.Namespace) -> int:
    """Handler of ``data check``: exit 0 when the dataset is usable, 1 otherwise."""
    options: dict[str, Any] = {}
    if args.format == "hitsz-vcm" and args.min_seq_len is not None:
        options["min_seq_len"] = args.min_seq_len
    if args.format == "bupt" and args.drop_last_rgb_batch:
        options["drop_last_rgb_batch"] = True
    report = check_dataset(args.format, args.root, deep=args.deep, **options)
    _emit(report.to_dict(max_problems=args.max_problems))
    limit = args.max_problems if args.max_problems > 0 else len(report.problems)
    for problem in report.problems[:limit]:
        sys.stderr.write(f"error: {problem}\n")
    if len(report.problems) > limit:
        sys.stderr.write(
            f"error: ... and {len(report.problems) - limit} more (--max-problems 0 lists all)\n"
        )
    return 0 if report.ok else 1


def run_synth(args: argparse.Namespace) -> int:
    """Handler of ``data synth``: writes a synthetic dataset; 1 on bad arguments."""
    start = time.perf_counter()
    try:
        summary = synthesize(
            args.out,
            args.format,
            ids=args.ids,
            cameras=args.cameras,
            seed=args.seed,
            frames=args.frames,
            image_size=args.size,
            vcm_layout=args.vcm_layout,
        )
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    summary["seconds"] = round(time.perf_counter() - start, 2)
    _emit(summary)
    return 0


def add_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``data`` with its ``check`` and ``synth`` subcommands (handlers in ``func``)."""
    data = subparsers.add_parser("data", help="check or synthesize datasets")
    commands = data.add_subparsers(dest="data_command", metavar="{check,synth}")
    commands.required = True

    check = commands.add_parser("check", help="validate a dataset and print a JSON summary")
    check.add_argument("--format", required=True, choices=sorted(DATASETS), help="dataset format")
    check.add_argument("root", help="dataset folder (manifest: the .jsonl file or its folder)")
    check.add_argument("--deep", action="store_true", help="also decode every frame (slow)")
    check.add_argument(
        "--max-problems",
        type=int,
        default=200,
        help="list at most this many problems (all are counted; 0 = list all)",
    )
    check.add_argument("--min-seq-len", type=int, default=None, help="HITSZ-VCM length filter (12)")
    check.add_argument(
        "--drop-last-rgb-batch",
        action="store_true",
        help="BUPTCampus: apply the official test loader's RGB drop",
    )
    check.set_defaults(func=run_check)

    synth = commands.add_parser("synth", help="write a synthetic dataset in a real format")
    synth.add_argument("--out", required=True, help="new or empty output folder")
    synth.add_argument("--format", required=True, choices=FORMATS, help="on-disk format")
    synth.add_argument("--ids", type=int, default=40, help="identities (half train, half test)")
    synth.add_argument("--cameras", type=int, default=4, help="cameras per modality")
    synth.add_argument("--seed", type=int, default=0,
                       help="random seed: the same seed writes the same dataset (default 0)")
    synth.add_argument(
        "--frames", type=parse_frames, default=(12, 16), help="frames per tracklet: MIN-MAX or N"
    )
    synth.add_argument("--size", type=parse_size, default=(128, 64), help="frame size HxW")
    synth.add_argument(
        "--vcm-layout",
        choices=("split", "flat"),
        default="split",
        help="HITSZ-VCM tree: Train/Test folders or flat",
    )
    synth.set_defaults(func=run_synth)
    return data
