"""``vvireid-index``: build, inspect, extend, prune and query gallery indexes.

Every command prints one JSON document on stdout (progress and logs go to stderr). Exit codes:
0 success; 1 a build/add stopped because more tracklets failed than ``--max-failures`` allows
(the failures are listed in the JSON, the index is unchanged); 2 a usage or input error (missing
or corrupt file, wrong checkpoint for the index, bad argument), reported on stderr in one line
naming the file or field.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vvireid.indexer.build import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_FAILURES,
    SOURCE_FORMATS,
    SPLITS,
    FailureBudget,
    TooManyFailuresError,
    add_to_index,
    build_index,
    load_tracklets,
    parse_shard,
    select_shard,
    shard_of,
)
from vvireid.indexer.encode import DECODE_MODES
from vvireid.indexer.gallery import (
    BACKENDS,
    BackendOptions,
    GalleryBackend,
    collection_name,
    open_gallery,
)
from vvireid.indexer.manifest import IMAGE_SUFFIXES, ManifestError, natural_key
from vvireid.model.types import Modality

log = logging.getLogger(__name__)

PROG = "vvireid-index"


def _emit(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Any]:
    from tqdm import tqdm

    with tqdm(
        total=total,
        file=sys.stderr,
        unit="tracklet",
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=0.5,
    ) as bar:
        yield bar.update


def _source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="model checkpoint (.safetensors)")
    parser.add_argument(
        "--gallery",
        required=True,
        help="manifest JSONL, folder tree <pid>/<modality>/<camid>/<tracklet>/, or dataset root",
    )
    parser.add_argument(
        "--format", default="manifest", choices=SOURCE_FORMATS, help="kind of --gallery"
    )
    parser.add_argument(
        "--split",
        default="test",
        choices=SPLITS,
        help="dataset split for hitsz-vcm/bupt; test = query + gallery of both directions",
    )
    parser.add_argument(
        "--modality",
        default="all",
        choices=("visible", "infrared", "all"),
        help="index only one modality",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] for encoding")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per model call")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="weights' dtype for encoding: auto is bf16 on CUDA, fp32 on the CPU",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model over static batch sizes (default: on CUDA only)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="frame-decoding worker threads (default: min(4, CPU cores))"
    )
    parser.add_argument(
        "--decode",
        default="auto",
        choices=DECODE_MODES,
        help="where JPEG frames are decoded and resized: cpu (worker threads), device (batched "
        "on the encode device, nvJPEG on CUDA; other frames on the CPU) or auto (device on "
        "CUDA when torchvision imports)",
    )
    parser.add_argument(
        "--max-failures",
        default=DEFAULT_MAX_FAILURES,
        help="tolerated bad tracklets: a count (5) or a fraction (0.01, 1%%); default 1%%",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help="tracklets per resumable checkpoint chunk",
    )
    parser.add_argument("--no-thumbnails", action="store_true", help="do not store JPEG thumbnails")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _backend_args(parser: argparse.ArgumentParser) -> None:
    """Where the gallery lives. Credentials never come from flags (ps, shell history): they are
    read from VVIREID_MILVUS_TOKEN(_FILE) or VVIREID_MILVUS_USER + VVIREID_MILVUS_PASSWORD(_FILE)."""
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="faiss: a local index folder (default); milvus: a collection named after the "
        "folder argument [VVIREID_BACKEND]",
    )
    parser.add_argument(
        "--milvus-uri",
        default=None,
        help="a .db path (Milvus Lite) or http(s)://host:19530 (Milvus server) "
        "[VVIREID_MILVUS_URI]",
    )


def _backend(args: argparse.Namespace) -> BackendOptions:
    return BackendOptions.from_env(getattr(args, "backend", None), getattr(args, "milvus_uri", None))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Build, inspect, extend, prune and query vvireid gallery indexes."
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log progress details to stderr"
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {importlib.metadata.version('vvireid')}",
        help="print the installed vvireid version and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="encode a gallery and write a new index")
    _source_args(build)
    build.add_argument("--out", required=True, help="index folder to create")
    build.add_argument(
        "--index-type",
        default="flat",
        choices=("flat", "ivf", "ivfpq"),
        help="flat: exact (default); ivf / ivfpq: approximate, for millions of tracklets",
    )
    build.add_argument(
        "--overwrite", action="store_true", help="replace an existing index in --out"
    )
    build.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="encode only shard I of N (a stable hash of the tracklet id); faiss: --out is this "
        "shard's gallery (merge them with 'merge'), milvus: all shards fill one collection; "
        "a rerun resumes",
    )
    _backend_args(build)
    build.set_defaults(func=_cmd_build)

    merge = sub.add_parser("merge", help="merge the FAISS galleries of a sharded build")
    merge.add_argument("out", help="index folder to create")
    merge.add_argument("shards", nargs="+", help="shard index folders")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing index")
    merge.set_defaults(func=_cmd_merge)

    info = sub.add_parser("info", help="describe an index")
    info.add_argument("index_dir", help="index folder (written by vvireid-index build)")
    info.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    _backend_args(info)
    info.set_defaults(func=_cmd_info)

    add = sub.add_parser("add", help="encode new tracklets into an existing index")
    add.add_argument("index_dir", help="index folder (written by vvireid-index build)")
    _source_args(add)
    _backend_args(add)
    add.set_defaults(func=_cmd_add)

    remove = sub.add_parser("remove", help="remove tracklets from an index")
    remove.add_argument("index_dir", help="index folder (written by vvireid-index build)")
    remove.add_argument(
        "--tracklet-id", nargs="+", required=True, dest="tracklet_ids", help="ids to remove"
    )
    remove.add_argument(
        "--ignore-missing",
        action="store_true",
        help="remove the ids that exist instead of refusing when some do not",
    )
    _backend_args(remove)
    remove.set_defaults(func=_cmd_remove)

    retrain = sub.add_parser(
        "retrain", help="retrain an IVF index on the stored vectors (searches go on meanwhile)"
    )
    retrain.add_argument("index_dir", help="index folder (written by vvireid-index build)")
    retrain.set_defaults(func=_cmd_retrain)

    migrate = sub.add_parser(
        "migrate", help="convert a format-1 index folder to the database format now"
    )
    migrate.add_argument("index_dir", help="index folder (written by vvireid-index build)")
    migrate.set_defaults(func=_cmd_migrate)

    search = sub.add_parser("search", help="query an index with a tracklet's frames")
    search.add_argument("index_dir", help="index folder (written by vvireid-index build)")
    search.add_argument(
        "--checkpoint", required=True, help="model checkpoint the index was built with"
    )
    search.add_argument(
        "--frames", nargs="+", required=True, help="frame files in order, or one folder"
    )
    search.add_argument(
        "--modality", required=True, help="modality of the query frames (visible|infrared)"
    )
    search.add_argument("--camid", type=int, default=None, help="camera index of the query")
    search.add_argument("--top-k", type=int, default=10, help="matches to return (default 10)")
    scope = search.add_mutually_exclusive_group()
    scope.add_argument(
        "--cross-modal",
        dest="scope",
        action="store_const",
        const="cross",
        help="search the other modality (default)",
    )
    scope.add_argument(
        "--same-modal",
        dest="scope",
        action="store_const",
        const="same",
        help="search the query's own modality",
    )
    scope.add_argument(
        "--any-modal",
        dest="scope",
        action="store_const",
        const="any",
        help="search both modalities",
    )
    search.add_argument(
        "--camera-filter",
        nargs="+",
        type=int,
        default=None,
        metavar="CAMID",
        help="only return gallery tracklets of these cameras",
    )
    search.add_argument(
        "--device", default="auto", help="auto, cpu or cuda[:N] for encoding and search"
    )
    _backend_args(search)
    search.set_defaults(func=_cmd_search, scope="cross")
    return parser


def _encoder(args: argparse.Namespace) -> Any:
    from vvireid.indexer.encode import TrackletEncoder
    from vvireid.model.checkpoint import load_checkpoint

    model = load_checkpoint(args.checkpoint)
    return TrackletEncoder(
        model,
        device=args.device,
        batch_size=args.batch_size,
        num_workers=getattr(args, "workers", None),
        dtype=getattr(args, "dtype", "auto"),
        compile=getattr(args, "compile", None),
        decode=getattr(args, "decode", "auto"),
    )


def _load_source(args: argparse.Namespace) -> tuple[list[Any], list[Any]]:
    modality = None if args.modality == "all" else Modality.parse(args.modality)
    tracklets, failures = load_tracklets(
        args.gallery, args.format, split=args.split, modality=modality
    )
    if not tracklets and not failures:
        scope = "" if modality is None else f" of modality {modality.label}"
        raise ValueError(f"{args.gallery}: no tracklets{scope} to index")
    return tracklets, failures


def _cmd_build(args: argparse.Namespace) -> int:
    budget = FailureBudget.parse(args.max_failures)
    options = _backend(args)
    shard = parse_shard(args.shard) if args.shard else (0, 1)
    tracklets, failures = _load_source(args)
    tracklets = select_shard(tracklets, *shard)
    failures = [f for f in failures if shard_of(str(f.tracklet_id or f.path), shard[1]) == shard[0]]
    encoder = _encoder(args)
    if options.backend == "milvus":
        from vvireid.indexer.milvus import build_milvus

        summary = _run_encoding(
            args, len(tracklets), build_milvus, options, collection_name(args.out), encoder,
            tracklets, index_type=args.index_type, overwrite=args.overwrite, budget=budget,
            prior_failures=failures,
        )
        _emit({**summary, "shard": args.shard})
        return 0
    if args.shard and not args.overwrite and _holds_index(args.out):
        # A rerun of a shard whose gallery was saved: add what is missing (nothing if complete).
        log.info("%s exists: resuming shard %s by adding what it lacks", args.out, args.shard)
        summary = _run_encoding(
            args, len(tracklets), add_to_index, args.out, encoder, tracklets,
            budget=budget, prior_failures=failures,
        )
        _emit({**summary, "shard": args.shard})
        return 0
    summary = _run_encoding(
        args, len(tracklets), build_index, args.out, encoder, tracklets,
        index_type=args.index_type, overwrite=args.overwrite, budget=budget,
        prior_failures=failures,
    )
    _emit({**summary, "shard": args.shard} if args.shard else summary)
    return 0


def _holds_index(folder: str) -> bool:
    """Whether ``folder`` already holds a saved gallery (any file but a build's partial chunks)."""
    path = Path(folder)
    return path.is_dir() and any(p.name != ".build-partial" for p in path.iterdir())


def _cmd_merge(args: argparse.Namespace) -> int:
    from vvireid.indexer.gallery import merge_galleries

    _emit(merge_galleries(args.out, args.shards, overwrite=args.overwrite))
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    budget = FailureBudget.parse(args.max_failures)
    tracklets, failures = _load_source(args)
    encoder = _encoder(args)
    options = _backend(args)
    if options.backend == "milvus":
        from vvireid.indexer.milvus import build_milvus

        # The same chunked insert as a Milvus build: ids already stored are skipped (an add is
        # resumable too), and a collection built by another model is refused.
        summary = _run_encoding(
            args, len(tracklets), build_milvus, options, collection_name(args.index_dir),
            encoder, tracklets, budget=budget, prior_failures=failures,
        )
        _emit({**summary, "command": "add"})
        return 0
    _emit(
        _run_encoding(
            args, len(tracklets), add_to_index, args.index_dir, encoder, tracklets,
            budget=budget, prior_failures=failures,
        )
    )
    return 0


def _run_encoding(
    args: argparse.Namespace, count: int, run: Callable[..., dict[str, Any]], *positional: Any,
    **options: Any,
) -> dict[str, Any]:
    """Call a build/add function over ``count`` tracklets with the command line's chunking,
    thumbnail and progress-bar options (one place for what build, add and shards share)."""
    with _progress(count, not args.no_progress) as update:
        return run(
            *positional,
            chunk_size=args.chunk_size,
            thumbnails=not args.no_thumbnails,
            progress=update,
            **options,
        )


def _cmd_info(args: argparse.Namespace) -> int:
    with open_gallery(
        args.index_dir, _backend(args), device="cpu", verify=not args.no_verify
    ) as index:
        _emit(index.stats())
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    with open_gallery(args.index_dir, _backend(args), device="cpu") as index:
        wanted = list(dict.fromkeys(args.tracklet_ids))
        missing = [t for t in wanted if t not in index]
        if missing and not args.ignore_missing:
            raise KeyError(
                f"{args.index_dir}: not in the index: {', '.join(missing)} "
                f"(nothing removed; --ignore-missing removes the others)"
            )
        removed = index.remove([t for t in wanted if t in index])
        if removed:
            _persist(index)
        _emit(
            {"index": str(index.path), "removed": removed, "missing": missing, "count": len(index)}
        )
    return 0


def _persist(index: GalleryBackend) -> None:
    """After a CLI write: Milvus flushes; a FAISS gallery snapshots only when one is due (the
    changes are committed already, and the next open replays them)."""
    due = getattr(index, "snapshot_if_due", None)
    if due is not None:
        due()
    else:
        index.save()


def _cmd_retrain(args: argparse.Namespace) -> int:
    from vvireid.indexer.store import GalleryIndex

    with GalleryIndex.open(args.index_dir, device="cpu") as index:
        _emit(index.retrain())
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    """Explicit conversion (``open`` also converts on first use; this runs it at a chosen time)."""
    from vvireid.indexer.legacy import migrate

    _emit(migrate(args.index_dir))
    return 0


def _expand_frames(frames: list[str]) -> list[str]:
    """A single folder argument means its image files in natural order."""
    if len(frames) == 1 and Path(frames[0]).is_dir():
        folder = Path(frames[0])
        images = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise ValueError(f"{folder}: holds no image files")
        return [str(p) for p in sorted(images, key=lambda p: natural_key(p.name))]
    return frames


def _cmd_search(args: argparse.Namespace) -> int:
    from vvireid.indexer.encode import TrackletEncoder
    from vvireid.model.checkpoint import load_checkpoint

    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    query_modality = Modality.parse(args.modality)
    gallery_modality = {"cross": query_modality.other, "same": query_modality, "any": None}[
        args.scope
    ]
    frames = _expand_frames(args.frames)
    model = load_checkpoint(args.checkpoint)
    encoder = TrackletEncoder(model, device=args.device)
    # A GPU for the model does not imply FAISS GPU support: search falls back to the CPU then.
    index_device = "cpu" if args.device == "cpu" else "auto"
    with open_gallery(
        args.index_dir,
        _backend(args),
        expected_fingerprint=model.fingerprint,
        expected_dim=encoder.dim,
        device=index_device,
    ) as index:
        vector = encoder.encode_frames(frames, camid=args.camid)
        hits = index.search(
            vector[None, :], args.top_k, modality=gallery_modality, camids=args.camera_filter
        )[0]
    _emit(
        {
            "query": {"frames": len(frames), "modality": query_modality.label, "camid": args.camid},
            "gallery_modality": None if gallery_modality is None else gallery_modality.label,
            "camera_filter": args.camera_filter,
            "top_k": args.top_k,
            "matches": [hit.to_dict() for hit in hits],
        }
    )
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, not a bug: reported in one line, exit code 2."""
    from vvireid.indexer.gallery import GalleryUnavailableError
    from vvireid.indexer.store import IndexConflictError
    from vvireid.model.checkpoint import CheckpointError

    return (
        CheckpointError,
        ManifestError,
        IndexConflictError,
        GalleryUnavailableError,
        ValueError,
        KeyError,
        OSError,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vvireid-index``; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage and the error
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except TooManyFailuresError as exc:
        _emit(
            {
                "error": str(exc),
                "failure_count": len(exc.failures),
                "max_failures": exc.allowed,
                "total": exc.total,
                "failures": [f.to_dict() for f in exc.failures],
            }
        )
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    except _user_errors() as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        sys.stderr.write(f"{PROG}: error: {message}\n")
        log.debug("details", exc_info=True)
        return 2
