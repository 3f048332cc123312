"""Building and extending gallery indexes: sources, failure budget, resumable encoding.

``build_index`` and ``add_to_index`` are what ``vvireid-index build|add`` run. Encoding a large
gallery takes hours, so the encoded vectors are checkpointed in chunks under
``<index>/.build-partial/``, keyed by the input list and the model: a rerun after a crash or a kill
encodes only what is missing. The index itself is only written at the end, through
``GalleryIndex.save`` (atomic), so the previous index stays usable until then.

Bad input (a manifest line that does not parse, an unreadable frame, an empty tracklet) is
reported per tracklet with its file and reason; the run fails only when the failures exceed the
user's budget (``--max-failures``, default 1% of the tracklets), and then writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from vvireid.indexer.backend import min_train_size
from vvireid.indexer.encode import EncodeFailure, TrackletEncoder
from vvireid.indexer.manifest import (
    ManifestError,
    parse_manifest,
    read_manifest_text,
    scan_folder,
)
from vvireid.indexer.sources import load_dataset
from vvireid.indexer.store import GalleryIndex, GalleryItem
from vvireid.model import fileio as files
from vvireid.model.types import Modality, Tracklet

log = logging.getLogger(__name__)

SOURCE_FORMATS = ("manifest", "hitsz-vcm", "bupt")
SPLITS = ("test", "query", "gallery", "train", "all")
PARTIAL_DIR = ".build-partial"
DEFAULT_MAX_FAILURES = "1%"
DEFAULT_CHUNK_SIZE = 256

Progress = Callable[[int], None]


class TooManyFailuresError(RuntimeError):
    """More tracklets failed than the budget allows; nothing was written to the index."""

    def __init__(self, failures: Sequence[EncodeFailure], allowed: int, total: int) -> None:
        self.failures = list(failures)
        self.allowed = allowed
        self.total = total
        super().__init__(
            f"{len(self.failures)} of {total} tracklets failed, more than the {allowed} allowed by "
            f"--max-failures; the index was not changed (fix the inputs and rerun: encoded "
            f"tracklets are kept and not encoded again)"
        )


@dataclass(frozen=True)
class FailureBudget:
    """How many tracklet failures a run tolerates: a count, or a fraction of the tracklets."""

    count: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str | int | float) -> FailureBudget:
        """``"5"`` -> 5 tracklets; ``"0.01"`` or ``"1%"`` -> 1% of them. Raises ValueError."""
        raw = str(text).strip()
        try:
            if raw.endswith("%"):
                value = float(raw[:-1]) / 100.0
            elif raw.isdigit():
                return cls(count=int(raw))
            else:
                value = float(raw)
        except ValueError:
            raise ValueError(
                f"--max-failures {raw!r}: use a count (5) or a fraction (0.01 or 1%)"
            ) from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(
                f"--max-failures {raw!r}: a fraction must be between 0 and 1 (0% and 100%)"
            )
        return cls(fraction=value)

    def allowed(self, total: int) -> int:
        if self.count is not None:
            return self.count
        return math.floor((self.fraction or 0.0) * total + 1e-9)


# ---- sources -----------------------------------------------------------------------------------


def read_manifest_lenient(path: str | Path) -> tuple[list[Tracklet], list[EncodeFailure]]:
    """Read a manifest keeping the good lines and reporting each bad one as a failure.

    The strict ``vvireid.indexer.manifest.read_manifest`` rejects a whole file for one bad line, which is
    right for training; an index build instead counts bad lines against its failure budget.

    Raises:
        ManifestError: the file is missing or unreadable.
    """
    path = Path(path).expanduser()
    text = read_manifest_text(path)
    base = path.resolve().parent
    good: list[Tracklet] = []
    bad: list[EncodeFailure] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            (tracklet,) = parse_manifest([line], source=where, base=base)
        except ManifestError as exc:
            reasons = [p.removeprefix(f"{where}:1: ") for p in exc.problems]
            bad.append(EncodeFailure(_line_id(line) or where, where, "; ".join(reasons)))
            continue
        if tracklet.tracklet_id in first_line:
            first = first_line[tracklet.tracklet_id]
            reason = f"tracklet_id: {tracklet.tracklet_id!r} duplicates line {first}"
            bad.append(EncodeFailure(tracklet.tracklet_id, where, reason))
            continue
        first_line[tracklet.tracklet_id] = number
        tracklet.extra["source"] = where
        good.append(tracklet)
    return good, bad


def _line_id(line: str) -> str | None:
    try:
        value = json.loads(line).get("tracklet_id")
    except (json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) and value.strip() else None


def load_tracklets(
    source: str | Path,
    fmt: str = "manifest",
    *,
    split: str = "test",
    modality: Modality | None = None,
) -> tuple[list[Tracklet], list[EncodeFailure]]:
    """The tracklets to index from a manifest file, a folder tree, or a dataset.

    ``manifest``: a JSONL file (bad lines become failures) or a folder laid out as
    ``<pid|unknown>/<modality>/<camid>/<tracklet>/`` (``vvireid.indexer.manifest.scan_folder``).
    ``hitsz-vcm``/``bupt``: the dataset's ``split``; ``test`` is every test tracklet (the query and
    gallery sets of both directions, deduplicated), ``all`` adds ``train``.

    Raises:
        ManifestError, ValueError (``vvireid.training.data.DatasetError``): unusable source.
    """
    if fmt not in SOURCE_FORMATS:
        raise ValueError(f"unknown source format {fmt!r}; known: {', '.join(SOURCE_FORMATS)}")
    failures: list[EncodeFailure] = []
    source = Path(source).expanduser()
    if fmt == "manifest" and source.is_dir():
        tracklets = scan_folder(source)
    elif fmt == "manifest":
        tracklets, failures = read_manifest_lenient(source)
    else:
        tracklets = _dataset_tracklets(source, fmt, split)
    if modality is not None:
        tracklets = [t for t in tracklets if t.modality == modality]
    return tracklets, failures


def _dataset_tracklets(root: Path, fmt: str, split: str) -> list[Tracklet]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    splits = load_dataset(fmt, root)
    parts: list[list[Tracklet]] = []
    if split in ("train", "all"):
        parts.append(splits.train)
    if split in ("test", "query", "all"):
        parts += list(splits.query.values())
    if split in ("test", "gallery", "all"):
        parts += list(splits.gallery.values())
    unique: dict[str, Tracklet] = {}
    for part in parts:
        for tracklet in part:
            unique.setdefault(tracklet.tracklet_id, tracklet)
    return list(unique.values())


# ---- sharded builds ----------------------------------------------------------------------------


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N (what ``--shard`` takes).

    Raises:
        ValueError: naming the value and the expected form.
    """
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: need 0 <= I < N and N >= 1")
    return index, count


def shard_of(tracklet_id: str, count: int) -> int:
    """The shard (0..count-1) of a tracklet: a stable hash of its id, so every run, machine and
    Python process puts it in the same shard (``hash()`` is salted per process)."""
    digest = hashlib.sha256(tracklet_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def select_shard(tracklets: Sequence[Tracklet], index: int, count: int) -> list[Tracklet]:
    """The disjoint, deterministic slice of ``tracklets`` that shard ``index`` of ``count`` encodes
    (order kept); together the shards cover every tracklet exactly once."""
    if count == 1:
        return list(tracklets)
    return [t for t in tracklets if shard_of(t.tracklet_id, count) == index]


# ---- resumable encoding ------------------------------------------------------------------------


def _input_key(encoder: TrackletEncoder, tracklets: Sequence[Tracklet], thumbnails: bool) -> str:
    """Identifies (inputs, model, preprocessing): saved chunks are only reused for the same key."""
    digest = hashlib.sha256()
    header = {
        "model": encoder.fingerprint,
        "pre": encoder.preprocessor.config.to_dict(),
        "thumbs": thumbnails,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for t in tracklets:
        record = [
            t.tracklet_id,
            list(t.frames),
            int(t.modality),
            t.camid,
            t.pid,
            t.timestamp,
            (t.extra or {}).get("camera"),
        ]
        digest.update(json.dumps(record, default=str).encode())
    return digest.hexdigest()[:32]


class PartialEncodings:
    """Chunks of encoded vectors saved under ``<index>/.build-partial/`` for resuming a run.

    Each chunk file holds the input positions it attempted, the positions that succeeded, their
    vectors and thumbnails. Failed positions are retried on resume (the user may have fixed them).
    """

    def __init__(self, index_dir: Path, key: str) -> None:
        self.folder = index_dir / PARTIAL_DIR
        self.key = key
        stamp = self.folder / "key.txt"
        if self.folder.exists() and (not stamp.is_file() or stamp.read_text().strip() != key):
            shutil.rmtree(self.folder)  # another input list or model: nothing reusable
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            files.write_bytes_atomic(stamp, key.encode())
        self._next = len(list(self.folder.glob("chunk-*.npz")))

    def load(self, dim: int) -> tuple[set[int], dict[int, tuple[np.ndarray, bytes | None]]]:
        """(attempted positions, {position: (vector, thumbnail)}) of every saved chunk."""
        attempted: set[int] = set()
        done: dict[int, tuple[np.ndarray, bytes | None]] = {}
        for file in sorted(self.folder.glob("chunk-*.npz")):
            try:
                with np.load(file, allow_pickle=False) as data:
                    vectors, positions = data["vectors"], data["positions"].tolist()
                    lengths, blob = data["thumb_len"].tolist(), data["thumb_data"].tobytes()
                    tried = data["attempted"].tolist()
            except (OSError, ValueError, KeyError) as exc:
                log.warning("ignoring unreadable partial chunk %s (%s)", file, exc)
                continue
            if vectors.shape != (len(positions), dim):
                continue
            attempted.update(tried)
            offsets = np.cumsum([0] + [max(n, 0) for n in lengths]).tolist()
            for row, (pos, n) in enumerate(zip(positions, lengths, strict=True)):
                thumb = blob[offsets[row] : offsets[row] + n] if n >= 0 else None
                done[pos] = (vectors[row], thumb)
        return attempted, done

    def save(
        self,
        attempted: Sequence[int],
        positions: Sequence[int],
        vectors: np.ndarray,
        thumbnails: Sequence[bytes | None],
    ) -> None:
        lengths = np.asarray([-1 if t is None else len(t) for t in thumbnails], dtype=np.int64)
        blob = np.frombuffer(b"".join(t or b"" for t in thumbnails), dtype=np.uint8)
        arrays = {
            "attempted": np.asarray(attempted, dtype=np.int64),
            "positions": np.asarray(positions, dtype=np.int64),
            "vectors": np.asarray(vectors, dtype=np.float32),
            "thumb_len": lengths,
            "thumb_data": blob,
        }
        name = f"chunk-{self._next:06d}.npz"
        files.write_stream_atomic(self.folder / name, lambda fh: np.savez(fh, **arrays))
        self._next += 1

    @staticmethod
    def clear(index_dir: Path) -> None:
        """Drop the saved chunks once their vectors are safely in the index."""
        shutil.rmtree(Path(index_dir) / PARTIAL_DIR, ignore_errors=True)


@dataclass
class EncodedSet:
    """Everything encoded for a run, in input order."""

    tracklets: list[Tracklet]
    vectors: np.ndarray
    thumbnails: list[bytes | None]
    failures: list[EncodeFailure]
    resumed: int
    encoded: int
    seconds: float


def encode_resumable(
    encoder: TrackletEncoder,
    tracklets: Sequence[Tracklet],
    index_dir: Path,
    *,
    budget: FailureBudget,
    prior_failures: Sequence[EncodeFailure] = (),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    thumbnails: bool = True,
    progress: Progress | None = None,
) -> EncodedSet:
    """Encode ``tracklets``, reusing and extending the chunks saved by an interrupted run.

    Raises:
        TooManyFailuresError: as soon as the failures (``prior_failures`` included) exceed the
            budget over all tracklets; chunks encoded so far stay saved for the next run.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk size must be >= 1, got {chunk_size}")
    repeated = sorted(t for t, n in Counter(t.tracklet_id for t in tracklets).items() if n > 1)
    if repeated:
        raise ValueError(f"tracklet id(s) listed more than once: {', '.join(repeated[:20])}")
    total = len(tracklets) + len(prior_failures)
    allowed = budget.allowed(total)
    failures = list(prior_failures)
    if len(failures) > allowed:
        raise TooManyFailuresError(failures, allowed, total)
    partial = PartialEncodings(index_dir, _input_key(encoder, tracklets, thumbnails))
    attempted, done = partial.load(encoder.dim)
    todo = [i for i in range(len(tracklets)) if i not in done]
    retry = [i for i in todo if i in attempted]
    if done:
        log.info(
            "resuming: %d tracklets already encoded, %d to go (%d retried)",
            len(done),
            len(todo),
            len(retry),
        )
    if progress:
        progress(len(done))
    started = time.perf_counter()
    chunks = encoder.encode_tracklets(
        [tracklets[i] for i in todo], chunk_size=chunk_size, thumbnails=thumbnails
    )
    for chunk in chunks:
        positions = todo[chunk.start : chunk.start + chunk.size]
        index_of = {tracklets[i].tracklet_id: i for i in positions}
        ok = [index_of[t.tracklet_id] for t in chunk.tracklets]
        partial.save(positions, ok, chunk.vectors, chunk.thumbnails)
        for pos, vector, thumb in zip(ok, chunk.vectors, chunk.thumbnails, strict=True):
            done[pos] = (vector, thumb)
        failures += chunk.failures
        if progress:
            progress(chunk.size)
        if len(failures) > allowed:
            chunks.close()
            raise TooManyFailuresError(failures, allowed, total)
    seconds = time.perf_counter() - started
    order = sorted(done)
    vectors = (
        np.stack([done[i][0] for i in order]) if order else np.zeros((0, encoder.dim), np.float32)
    )
    return EncodedSet(
        tracklets=[tracklets[i] for i in order],
        vectors=vectors.astype(np.float32),
        thumbnails=[done[i][1] for i in order],
        failures=failures,
        resumed=len(tracklets) - len(todo),
        encoded=len(todo),
        seconds=seconds,
    )


# ---- build / add -------------------------------------------------------------------------------


def gallery_item(tracklet: Tracklet) -> GalleryItem:
    """The index metadata of a tracklet (camera display name from ``extra['camera']``)."""
    return GalleryItem(
        tracklet_id=tracklet.tracklet_id,
        modality=Modality.parse(tracklet.modality),
        camid=int(tracklet.camid),
        camera=(tracklet.extra or {}).get("camera"),
        pid=tracklet.pid,
        timestamp=tracklet.timestamp,
        frames=tuple(str(f) for f in tracklet.frames),
    )


def _summary(
    command: str,
    index: GalleryIndex,
    encoded: EncodedSet,
    allowed: int,
    encoder: TrackletEncoder,
    warnings: list[str],
) -> dict[str, Any]:
    added = Counter(Modality.parse(t.modality).label for t in encoded.tracklets)
    return {
        "command": command,
        "index": str(index.path),
        "index_type": index.index_type,
        "count": len(index),
        "added": len(encoded.tracklets),
        "added_per_modality": {m.label: added.get(m.label, 0) for m in Modality},
        "resumed": encoded.resumed,
        "encoded": encoded.encoded,
        "seconds": round(encoded.seconds, 3),
        "tracklets_per_s": round(encoded.encoded / encoded.seconds, 2)
        if encoded.seconds > 0
        else None,
        "device": str(encoder.device),
        "failure_count": len(encoded.failures),
        "max_failures": allowed,
        "failures": [f.to_dict() for f in encoded.failures],
        "warnings": warnings,
    }


def build_index(
    out: str | Path,
    encoder: TrackletEncoder,
    tracklets: Sequence[Tracklet],
    *,
    index_type: str = "flat",
    overwrite: bool = False,
    budget: FailureBudget | None = None,
    prior_failures: Sequence[EncodeFailure] = (),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    thumbnails: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Encode ``tracklets`` and write a new index at ``out``; returns the run summary.

    An ``ivf``/``ivfpq`` request on a gallery too small to train falls back to ``flat`` (exact)
    with a warning in the summary.

    Raises:
        FileExistsError: ``out`` holds an index and ``overwrite`` is False (checked first).
        TooManyFailuresError: failures beyond the budget; ``out`` is left as it was.
    """
    if not encoder.fingerprint:
        raise ValueError(
            "the model has no fingerprint: load it with model.checkpoint.load_checkpoint"
        )
    budget = budget or FailureBudget.parse(DEFAULT_MAX_FAILURES)
    out = Path(out)

    def create(kind: str) -> GalleryIndex:
        return GalleryIndex.create(
            out,
            dim=encoder.dim,
            model_fingerprint=str(encoder.fingerprint),
            similarity=encoder.similarity,
            index_type=kind,
            model_config=encoder.model.config.to_dict(),
            overwrite=overwrite,
            device="cpu",
        )

    create(index_type).close()  # fail fast on an existing index or bad parameters, before hours of encoding
    encoded = encode_resumable(
        encoder,
        tracklets,
        out,
        budget=budget,
        prior_failures=prior_failures,
        chunk_size=chunk_size,
        thumbnails=thumbnails,
        progress=progress,
    )
    warnings = []
    if len(encoded.tracklets) < min_train_size(index_type):
        warnings.append(
            f"{index_type} needs at least {min_train_size(index_type)} tracklets to train, got "
            f"{len(encoded.tracklets)}: built an exact flat index instead"
        )
        log.warning(warnings[-1])
        index_type = "flat"
    with create(index_type) as index:
        index.add(
            [gallery_item(t) for t in encoded.tracklets],
            encoded.vectors,
            encoded.thumbnails if thumbnails else None,
        )
        index.save()
        PartialEncodings.clear(out)
        return _summary(
            "build",
            index,
            encoded,
            budget.allowed(len(tracklets) + len(prior_failures)),
            encoder,
            warnings,
        )


def add_to_index(
    index_dir: str | Path,
    encoder: TrackletEncoder,
    tracklets: Sequence[Tracklet],
    *,
    budget: FailureBudget | None = None,
    prior_failures: Sequence[EncodeFailure] = (),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    thumbnails: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Encode the tracklets not yet in the index and add them; already indexed ids are skipped
    and listed under ``duplicates`` in the summary.

    Raises:
        IndexMismatchError: the index was built with another model.
        TooManyFailuresError: failures beyond the budget; the index is left as it was.
    """
    budget = budget or FailureBudget.parse(DEFAULT_MAX_FAILURES)
    with GalleryIndex.open(
        index_dir, expected_fingerprint=encoder.fingerprint, expected_dim=encoder.dim, device="cpu"
    ) as index:
        duplicates = [t.tracklet_id for t in tracklets if t.tracklet_id in index]
        fresh = [t for t in tracklets if t.tracklet_id not in index]
        encoded = encode_resumable(
            encoder,
            fresh,
            index.path,
            budget=budget,
            prior_failures=prior_failures,
            chunk_size=chunk_size,
            thumbnails=thumbnails,
            progress=progress,
        )
        if encoded.tracklets:
            index.add(
                [gallery_item(t) for t in encoded.tracklets],
                encoded.vectors,
                encoded.thumbnails if thumbnails else None,
            )
            index.snapshot_if_due()  # committed already; a full snapshot only when one is due
        PartialEncodings.clear(index.path)
        summary = _summary(
            "add", index, encoded, budget.allowed(len(fresh) + len(prior_failures)), encoder, []
        )
        summary["duplicates"] = duplicates
        return summary
