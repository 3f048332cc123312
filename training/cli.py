"""vvireid-train: train (fit), evaluate a checkpoint (eval), calibrate scores, check/synthesize data.

Examples:

    vvireid-train fit --config vld_hitsz_vcm --data-root /data/HITSZ-VCM --out runs/vld \\
        --pretrained ViT-B-16.pt
    vvireid-train fit --out runs/vld --data-root /data/HITSZ-VCM --resume
    torchrun --nproc_per_node 4 -m vvireid.training fit --config vld_hitsz_vcm ...
    vvireid-train eval --checkpoint runs/vld/model.safetensors --data-root /data/HITSZ-VCM
    vvireid-train data synth --format hitsz-vcm --out /tmp/vcm-synth

User errors (missing data, a bad config key, an unusable checkpoint) print one "error:" line
on stderr and exit with status 2; --verbose adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DATA_ROOT_ENV = "VVIREID_DATA_ROOT"
# Top-level modules only the `train` extra installs (pyproject.toml).
TRAIN_EXTRA_MODULES = frozenset({"yaml", "tensorboard"})
DEVICE_HELP = "auto (CUDA when available, default), cpu, cuda or cuda:N"
WORKERS_HELP = "frame-decoding worker processes (0 decodes in the main process; default 2)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with ``fit``, ``eval`` and ``data`` subcommands."""
    from vvireid.training.data.cli import add_data_parser

    parser = argparse.ArgumentParser(
        prog="vvireid-train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {importlib.metadata.version('vvireid')}",
                        help="print the installed vvireid version and exit")
    commands = parser.add_subparsers(dest="command", metavar="{fit,eval,calibrate,data}")
    commands.required = True
    _add_fit(commands)
    _add_eval(commands)
    _add_calibrate(commands)
    add_data_parser(commands)
    return parser


def _add_fit(commands: Any) -> None:
    from vvireid.training.config import available_configs

    recipes = ", ".join(available_configs())
    fit = commands.add_parser(
        "fit", help="train a model from a recipe",
        description="Train a model from a recipe.",
        epilog=f"recipes (training/configs, or any YAML file of the same shape): {recipes}",
    )
    fit.add_argument("--config", help="recipe name (e.g. vld_hitsz_vcm, smoke) or YAML path; "
                     "optional with --resume (the run's saved config is used)")
    fit.add_argument("--data-root", help=f"dataset folder (default: ${DATA_ROOT_ENV})")
    fit.add_argument("--out", required=True, help="run folder (checkpoints, logs, report)")
    fit.add_argument("--pretrained", help="CLIP weights file or open_clip pretrained tag")
    fit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set optim.lr=1e-5 (repeatable)")
    fit.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last completed epoch")
    fit.add_argument("--select-best-on-test", action="store_true",
                     help="keep the epoch the method's official code keeps (VLD: best test "
                     "ir_to_vis R1; X-ReID: best R1+mAP of both directions over its 4 feature "
                     "variants): test-set model selection, named in the report. Default: final "
                     "epoch")
    fit.add_argument("--device", default="auto", help=DEVICE_HELP)
    fit.set_defaults(func=run_fit)


def _add_eval(commands: Any) -> None:
    ev = commands.add_parser("eval", help="evaluate a checkpoint on a dataset's test protocol")
    ev.add_argument("--checkpoint", required=True, help="model.safetensors written by fit")
    ev.add_argument("--data-root", help=f"dataset folder (default: ${DATA_ROOT_ENV})")
    ev.add_argument("--dataset", choices=("hitsz-vcm", "bupt", "manifest"),
                    help="dataset format (default: the one the checkpoint was trained on)")
    ev.add_argument("--out", help="folder for report.json, cmc.png and ranklist.png "
                    "(default: <checkpoint folder>/eval)")
    ev.add_argument("--dense", action="store_true",
                    help="average all consecutive clips of each tracklet (X-ReID eval_all)")
    ev.add_argument("--test-sampling", help="override the dataset's test frame rule")
    ev.add_argument("--batch-size", type=int, default=32,
                    help="tracklets per model call (default 32)")
    ev.add_argument("--workers", type=int, default=2, help=WORKERS_HELP)
    ev.add_argument("--max-rank", type=int, default=20,
                    help="longest CMC curve reported, R1..R<max-rank> (default 20)")
    ev.add_argument("--drop-last-rgb-batch", action="store_true",
                    help="BUPTCampus: reproduce the official loader's RGB drop")
    ev.add_argument("--rerank", action="store_true",
                    help="k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3) of each query's "
                    "top --rerank-shortlist; the report keeps the plain metrics too")
    ev.add_argument("--rerank-shortlist", type=int, default=100,
                    help="gallery items re-ranked per query (default 100)")
    ev.add_argument("--vis-queries", default="worst",
                    help="rank-list queries: worst | best | random | a comma list of query "
                    "tracklet ids (default worst: failures first)")
    ev.add_argument("--vis-num", type=int, default=4, help="rank-list queries per direction")
    ev.add_argument("--device", default="auto", help=DEVICE_HELP)
    ev.set_defaults(func=run_eval)


def _add_calibrate(commands: Any) -> None:
    cal = commands.add_parser("calibrate", help="fit what score means 'same person' for a "
                              "checkpoint (writes <checkpoint>.calibration.json and a histogram)")
    cal.add_argument("--checkpoint", required=True, help="model.safetensors written by fit")
    cal.add_argument("--data-root", help=f"labelled dataset folder (default: ${DATA_ROOT_ENV})")
    cal.add_argument("--format", choices=("hitsz-vcm", "bupt", "manifest"),
                     help="dataset format (default: the one the checkpoint was trained on); "
                     "'manifest' reads a labelled manifest")
    cal.add_argument("--split", choices=("test", "train"), default="test",
                     help="labelled tracklets to pair (default: test, which training never saw)")
    cal.add_argument("--prior", type=float, default=0.5,
                     help="prior probability of a same-identity pair (default 0.5: even odds)")
    cal.add_argument("--out", help="calibration JSON path (default: <checkpoint>.calibration.json)")
    cal.add_argument("--batch-size", type=int, default=32,
                     help="tracklets per model call (default 32)")
    cal.add_argument("--workers", type=int, default=2, help=WORKERS_HELP)
    cal.add_argument("--device", default="auto", help=DEVICE_HELP)
    cal.set_defaults(func=run_calibrate)


def _data_root(value: str | None) -> Path:
    root = value or os.environ.get(DATA_ROOT_ENV)
    if not root:
        raise UsageError(f"--data-root is required (or set ${DATA_ROOT_ENV})")
    path = Path(root).expanduser()
    if not path.exists():
        raise UsageError(f"{path}: data root does not exist")
    return path


class UsageError(ValueError):
    """A command-line mistake."""


def _quiet_root_info(record: logging.LogRecord) -> bool:
    """Drop open_clip's INFO chatter (it logs through the root logger); vvireid never does."""
    return record.name != "root" or record.levelno >= logging.WARNING


def _is_stderr_handler(handler: logging.Handler) -> bool:
    """Ours from an earlier call, or one the embedding program (the demo) installed first.

    Why: a second stderr handler printed every log line twice (once per format).
    """
    if getattr(handler, "_vvireid", "") == "stderr":
        return True
    return type(handler) is logging.StreamHandler and handler.stream in (sys.stderr,
                                                                          sys.__stderr__)


def configure_logging(verbose: bool, run_dir: Path | None = None, rank: int = 0) -> None:
    """Log to stderr (warnings only on ranks > 0) and, on rank 0, to ``RUN/train.log``."""
    root = logging.getLogger()
    level = logging.DEBUG if verbose else logging.INFO
    root.setLevel(level)
    # faiss's loader logs every instruction set it tries at INFO (a ModuleNotFoundError for
    # swigfaiss_avx512 on most CPUs); only its warnings matter.
    logging.getLogger("faiss.loader").setLevel(logging.DEBUG if verbose else logging.WARNING)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if not any(_is_stderr_handler(h) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(level if rank == 0 else logging.WARNING)
        handler.setFormatter(formatter)
        handler.addFilter(_quiet_root_info)
        handler._vvireid = "stderr"  # type: ignore[attr-defined]
        root.addHandler(handler)
    if run_dir is not None and rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        handler.setFormatter(formatter)
        handler._vvireid = "file"  # type: ignore[attr-defined]
        root.addHandler(handler)


def _remove_file_handlers() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_vvireid", "") == "file":
            root.removeHandler(handler)
            handler.close()


def _fit_config(args: argparse.Namespace) -> Any:
    from vvireid.training.config import load_config
    from vvireid.training.trainer import CONFIG_FILE, read_run_config

    run_dir = Path(args.out).expanduser()
    if args.resume:
        if args.config or args.set:
            return load_config(args.config or run_dir / CONFIG_FILE, args.set)
        return read_run_config(run_dir)
    if not args.config:
        raise UsageError("--config is required (unless --resume continues a run)")
    return load_config(args.config, args.set)


def run_fit(args: argparse.Namespace) -> int:
    """Handler of ``fit``: train, then print the final report's metrics as JSON (rank 0)."""
    from vvireid.training.distributed import init_distributed, shutdown
    from vvireid.training.trainer import Trainer

    config = _fit_config(args)
    data_root = _data_root(args.data_root)
    dist = init_distributed(args.device)
    run_dir = Path(args.out).expanduser()
    configure_logging(args.verbose, run_dir, dist.rank)
    try:
        trainer = Trainer(config, data_root, run_dir, pretrained=args.pretrained,
                          resume=args.resume, select_best_on_test=args.select_best_on_test,
                          dist=dist)
        report = trainer.fit()
    finally:
        _remove_file_handlers()
        shutdown(dist)
    if dist.is_main:
        summary = {k: report.get(k) for k in ("dataset", "method", "config", "selection",
                                              "checkpoint", "directions")}
        summary["run_dir"] = str(run_dir)
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Handler of ``eval``: both directions, JSON on stdout, report and pictures in ``--out``."""
    from vvireid.indexer.rerank import RerankParams
    from vvireid.indexer.sources import load_dataset
    from vvireid.model.checkpoint import load_checkpoint, read_checkpoint_metadata
    from vvireid.model.device import resolve_device
    from vvireid.training.report import (
        build_report,
        evaluate_model,
        metrics_dict,
        protocol_notes,
        write_eval_outputs,
    )

    configure_logging(args.verbose)
    checkpoint = Path(args.checkpoint).expanduser()
    meta = read_checkpoint_metadata(checkpoint)
    data_root = _data_root(args.data_root)
    fmt = args.dataset or meta["extra"].get("data_format")
    if not fmt:
        raise UsageError(f"{checkpoint}: does not record its dataset format; pass --dataset")
    device = resolve_device(args.device, local_rank=0)
    model = load_checkpoint(checkpoint, map_location=device)
    options = {"drop_last_rgb_batch": True} if fmt == "bupt" and args.drop_last_rgb_batch else {}
    splits = load_dataset(fmt, data_root, **options)
    rule = args.test_sampling or splits.test_sampling
    rerank = RerankParams(shortlist=args.rerank_shortlist) if args.rerank else None
    results = evaluate_model(model, splits, device=device, test_sampling=rule, dense=args.dense,
                             batch_size=args.batch_size, num_workers=args.workers,
                             max_rank=args.max_rank, rerank=rerank)
    if not results:
        raise UsageError(f"{data_root}: the dataset has no query/gallery pairs to evaluate")
    notes = protocol_notes(splits.name, splits.filter_same_camera, rule, model.seq_len,
                           model.similarity, args.dense)
    report = build_report(results, dataset=splits.name, notes=notes, checkpoint=str(checkpoint),
                          fingerprint=model.fingerprint, method=model.config.method,
                          trained_on=meta["extra"].get("dataset"),
                          trained_epochs=meta["extra"].get("epoch"))
    if rerank is not None:
        report["rerank"] = {
            "k1": rerank.k1, "k2": rerank.k2, "lambda": rerank.lambda_value,
            "shortlist": rerank.shortlist,
            "without_rerank": {name: metrics_dict(d.variants["no_rerank"], len(d.query),
                                                  len(d.gallery)) for name, d in results.items()},
        }
    out = Path(args.out).expanduser() if args.out else checkpoint.parent / "eval"
    report["files"] = write_eval_outputs(out, report, results,
                                         filter_same_camera=splits.filter_same_camera,
                                         vis_queries=args.vis_queries, num_queries=args.vis_num)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    """Handler of ``calibrate``: fit, store beside the checkpoint, print the summary as JSON."""
    from vvireid.model.checkpoint import read_checkpoint_metadata
    from vvireid.model.device import resolve_device
    from vvireid.training.calibrate import calibrate_checkpoint

    configure_logging(args.verbose)
    checkpoint = Path(args.checkpoint).expanduser()
    fmt = args.format or read_checkpoint_metadata(checkpoint)["extra"].get("data_format")
    if not fmt:
        raise UsageError(f"{checkpoint}: does not record its dataset format; pass --format")
    summary = calibrate_checkpoint(checkpoint, _data_root(args.data_root), fmt, split=args.split,
                                   device=resolve_device(args.device), prior=args.prior,
                                   batch_size=args.batch_size, num_workers=args.workers,
                                   out=args.out)
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    from vvireid.indexer.manifest import ManifestError
    from vvireid.indexer.sources.splits import DatasetError
    from vvireid.model.backbone import WeightsError
    from vvireid.model.checkpoint import CheckpointError
    from vvireid.model.preprocess import FrameError
    from vvireid.training.config import ConfigError
    from vvireid.training.trainer import TrainingError

    return (UsageError, ConfigError, TrainingError, DatasetError, CheckpointError, WeightsError,
            FrameError, ManifestError, ValueError, FileNotFoundError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vvireid-train``; returns the exit status.

    An install without the ``train`` extra (the serving image, ``pip install 'vvireid[serve]'``)
    still has this command: it then says which extra to install instead of a traceback.
    """
    try:
        return _run(argv)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        sys.stderr.write(f"error: vvireid-train needs the training dependencies (module {exc.name} "
                         "is missing): pip install 'vvireid[train]'\n")
        return EXIT_USAGE


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: the last completed epoch's checkpoint is intact; continue "
                         "with `vvireid-train fit --out RUN --resume`\n")
        return EXIT_INTERRUPTED
    except _user_errors() as exc:
        if args.verbose:
            log.exception("failed")
        message = str(exc).strip() or type(exc).__name__
        sys.stderr.write(f"error: {message}\n")
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
