"""``GalleryIndex``: the on-disk gallery of encoded tracklets that the server searches.

Folder layout (``FORMAT_VERSION`` 1)::

    manifest.json             the commit point: format, dim, metric, similarity, index type and
                              parameters, model fingerprint and config, counts, created/updated,
                              and name + sha256 + size of every data file below
    index.<gen>.faiss         the FAISS index over internal int64 ids (see indexer.backend)
    items.<gen>.jsonl         one line per tracklet: internal id, tracklet_id, modality, camid,
                              camera, pid, timestamp, frames, thumbnail location
    vectors.<gen>.npy         float32 [N, D] rows in id order (ivfpq only: exact re-ranking)
    thumbs.<gen>.bin          JPEG thumbnails, concatenated (append-only segments, compacted
                              when more than half of their bytes belong to removed items)

Why generations: ``save`` writes every data file under a new generation number (temp name, fsync,
rename), then atomically replaces ``manifest.json`` last, then deletes the files the new manifest no
longer names. A process killed at any moment therefore leaves a manifest that names complete,
checksummed files: the previous index, or the new one once the manifest swap happened. Files of an
interrupted save are unreferenced and removed by the next save. ``open`` verifies every checksum,
so a corrupted file is refused with its name instead of returning wrong neighbours.

Internal ids are assigned in increasing order and never reused, so items, vectors and thumbnails
stay aligned without renumbering when tracklets are removed.

Thread safety: any number of threads may ``search``/``get``/``thumbnail`` at once; ``add``,
``remove`` and ``save`` take an exclusive lock (FAISS CPU search is thread-safe, writes are not;
GPU searches are serialised inside the backend). Separate processes writing one folder are
serialised by a lock file, and a writer refuses to save over a generation it did not load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from vvireid.indexer.backend import (
    INDEX_TYPES,
    IndexParams,
    Selection,
    VectorIndex,
    configure_faiss,
)
from vvireid.model import fileio as files
from vvireid.model.types import Modality

log = logging.getLogger(__name__)

FORMAT = "vvireid.index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIMILARITIES = ("cosine", "inner_product")
_DATA_FILE = re.compile(r"^(index|items|vectors|thumbs)\.\d{6}\.(faiss|jsonl|npy|bin)$")
_COMPACT_MIN_BYTES = 1 << 20


class IndexFormatError(ValueError):
    """An index folder cannot be used (missing, corrupt or foreign file); names the file."""


class IndexMismatchError(ValueError):
    """The index was built by another model (fingerprint or dimension differ)."""


class IndexConflictError(RuntimeError):
    """Another writer saved the index since this process opened it; reopen and redo the change."""


@dataclass(frozen=True)
class GalleryItem:
    """Metadata of one indexed tracklet (``camera`` is a display name, ``camid`` the index)."""

    tracklet_id: str
    modality: Modality
    camid: int
    camera: str | None = None
    pid: int | None = None
    timestamp: float | None = None
    frames: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON form (modality as its label)."""
        return {
            "tracklet_id": self.tracklet_id,
            "modality": self.modality.label,
            "camid": self.camid,
            "camera": self.camera,
            "pid": self.pid,
            "timestamp": self.timestamp,
            "frames": list(self.frames),
        }


@dataclass(frozen=True)
class Hit:
    """One search result; ``rank`` starts at 1, ``score`` is the similarity (higher is closer)."""

    rank: int
    tracklet_id: str
    score: float
    modality: Modality
    camid: int
    camera: str | None
    pid: int | None
    timestamp: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "tracklet_id": self.tracklet_id,
            "score": self.score,
            "modality": self.modality.label,
            "camid": self.camid,
            "camera": self.camera,
            "pid": self.pid,
            "timestamp": self.timestamp,
        }


class _RWLock:
    """Many readers or one writer; a waiting writer blocks new readers so writes are not starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._writer and not self._readers)
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_item(item: GalleryItem) -> str | None:
    """Why ``item`` cannot be indexed, or None."""
    if not isinstance(item.tracklet_id, str) or not item.tracklet_id.strip():
        return f"tracklet_id must be a non-empty string, got {item.tracklet_id!r}"
    if not isinstance(item.modality, Modality):
        return f"{item.tracklet_id}: modality must be a Modality, got {item.modality!r}"
    if (
        isinstance(item.camid, bool)
        or not isinstance(item.camid, (int, np.integer))
        or item.camid < 0
    ):
        return f"{item.tracklet_id}: camid must be an integer >= 0, got {item.camid!r}"
    return None


class GalleryIndex:
    """A persistent, searchable gallery of tracklet vectors; see the module docstring.

    Build with :meth:`create`, load with :meth:`open`; changes are in memory until :meth:`save`.
    """

    def __init__(self, path: Path, header: dict[str, Any], vindex: VectorIndex) -> None:
        self.path = path
        self.dim: int = int(header["dim"])
        self.fingerprint: str = str(header["model_fingerprint"])
        self.similarity: str = str(header["similarity"])
        self.index_type: str = str(header["index_type"])
        self.model_config: dict[str, Any] = dict(header.get("model_config") or {})
        self._generation = int(header.get("generation", 0))
        self._created = str(header.get("created") or _now())
        self._updated = str(header.get("updated") or self._created)
        self._next_id = int(header.get("next_id", 0))
        self._vindex = vindex
        self._ids = np.zeros(0, dtype=np.int64)
        self._modality = np.zeros(0, dtype=np.int8)
        self._camid = np.zeros(0, dtype=np.int64)
        self._items: list[GalleryItem] = []
        self._id_of: dict[str, int] = {}
        self._thumb_at: dict[int, tuple[str, int, int]] = {}
        self._pending_thumbs: dict[int, bytes] = {}
        self._segments: dict[str, dict[str, Any]] = {}
        self._selections: dict[tuple[Any, ...], Selection] = {}
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        self._lock = _RWLock()
        self._dirty = False

    # ---- construction --------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        dim: int,
        model_fingerprint: str,
        similarity: str,
        index_type: str = "flat",
        model_config: dict[str, Any] | None = None,
        overwrite: bool = False,
        device: str = "auto",
        nprobe: int | None = None,
    ) -> GalleryIndex:
        """A new, empty index for ``path`` (nothing is written before :meth:`save`).

        With ``overwrite`` an existing index in ``path`` stays loadable and unchanged until the
        new one is saved over it.

        Raises:
            ValueError: bad dim, similarity or index type.
            FileExistsError: ``path`` already holds an index and ``overwrite`` is False.
        """
        if index_type not in INDEX_TYPES:
            raise ValueError(f"unknown index type {index_type!r}; known: {', '.join(INDEX_TYPES)}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {similarity!r}; known: {', '.join(SIMILARITIES)}")
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        path = Path(path)
        generation = 0
        if (path / MANIFEST).exists():
            if not overwrite:
                raise FileExistsError(f"{path}: already holds an index (overwrite it explicitly)")
            with contextlib.suppress(IndexFormatError):
                generation = int(_read_header(path).get("generation", 0))
        path.mkdir(parents=True, exist_ok=True)
        configure_faiss()
        header = {
            "dim": int(dim),
            "model_fingerprint": model_fingerprint,
            "similarity": similarity,
            "index_type": index_type,
            "model_config": model_config or {},
            "generation": generation,
        }
        vindex = VectorIndex(index_type, int(dim), IndexParams(nprobe=nprobe or 0))
        index = cls(path, header, vindex)
        index._dirty = True
        index._select_device(device)
        return index

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        expected_fingerprint: str | None = None,
        expected_dim: int | None = None,
        device: str = "auto",
        verify: bool = True,
        nprobe: int | None = None,
    ) -> GalleryIndex:
        """Load an index, checking the model it was built with and every file's checksum.

        Raises:
            IndexFormatError: missing or corrupt manifest or data file (the message names it).
            IndexMismatchError: ``expected_fingerprint``/``expected_dim`` differ from the index's.
        """
        path = Path(path)
        for _attempt in range(3):
            header = _read_header(path)
            _check_model(path, header, expected_fingerprint, expected_dim)
            try:
                index = cls._load(path, header, verify)
            except FileNotFoundError as exc:
                if _read_header(path).get("generation") == header.get("generation"):
                    raise IndexFormatError(
                        f"{exc.filename}: data file listed in {path / MANIFEST} is missing"
                    ) from None
                continue  # a writer committed a new generation while we read: retry on it
            if nprobe:
                index._vindex.params.nprobe = int(nprobe)
            index._select_device(device)
            log.info("opened index %s: %d tracklets (%s)", path, len(index), index.index_type)
            return index
        raise IndexFormatError(f"{path / MANIFEST}: the index keeps changing while being opened")

    @classmethod
    def _load(cls, path: Path, header: dict[str, Any], verify: bool) -> GalleryIndex:
        configure_faiss()
        listed = header["files"]
        if verify:
            for entry in [listed["index"], listed["items"], *listed.get("thumbnails", [])] + (
                [listed["vectors"]] if "vectors" in listed else []
            ):
                _verify_file(path, entry)
        params = IndexParams.from_dict(header.get("index_params") or {})
        try:
            vindex = VectorIndex.read(
                header["index_type"], int(header["dim"]), params, path / listed["index"]["name"]
            )
        except RuntimeError as exc:
            raise IndexFormatError(
                f"{path / listed['index']['name']}: not a readable FAISS index ({exc})"
            ) from None
        index = cls(path, header, vindex)
        index._read_items(path / listed["items"]["name"])
        index._segments = {e["name"]: e for e in listed.get("thumbnails", [])}
        if "vectors" in listed:
            vectors = _load_vectors(path / listed["vectors"]["name"], len(index), index.dim)
            vindex.set_exact(index._ids, vectors)
        if vindex.ntotal != len(index) or vindex.index.d != index.dim:
            raise IndexFormatError(
                f"{path / listed['index']['name']}: holds {vindex.ntotal} vectors of dim "
                f"{vindex.index.d}, but {listed['items']['name']} lists {len(index)} "
                f"tracklets of dim {index.dim}"
            )
        return index

    def _read_items(self, file: Path) -> None:
        ids, mods, cams = [], [], []
        with open(file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    record = json.loads(line)
                    item = GalleryItem(
                        tracklet_id=str(record["tracklet_id"]),
                        modality=Modality.parse(record["modality"]),
                        camid=int(record["camid"]),
                        camera=record.get("camera"),
                        pid=record.get("pid"),
                        timestamp=record.get("timestamp"),
                        frames=tuple(record.get("frames") or ()),
                    )
                    internal = int(record["id"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    raise IndexFormatError(
                        f"{file}:{number}: malformed item record ({exc})"
                    ) from None
                if ids and internal <= ids[-1]:
                    raise IndexFormatError(
                        f"{file}:{number}: ids must increase ({internal} after {ids[-1]})"
                    )
                ids.append(internal)
                mods.append(int(item.modality))
                cams.append(item.camid)
                self._items.append(item)
                self._id_of[item.tracklet_id] = internal
                if record.get("thumb"):
                    name, offset, length = record["thumb"]
                    self._thumb_at[internal] = (str(name), int(offset), int(length))
        self._ids = np.asarray(ids, dtype=np.int64)
        self._modality = np.asarray(mods, dtype=np.int8)
        self._camid = np.asarray(cams, dtype=np.int64)

    def _select_device(self, device: str) -> None:
        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda")
        if device == "cpu":
            return
        on_gpu = self._vindex.enable_gpu()
        if device.startswith("cuda") and not on_gpu:
            raise ValueError(
                f"device {device!r} requested, but FAISS has no GPU support or sees no GPU"
            )

    # ---- reading -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, tracklet_id: object) -> bool:
        return tracklet_id in self._id_of

    def __enter__(self) -> GalleryIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def device(self) -> str:
        return "cuda" if self._vindex.use_gpu else "cpu"

    @property
    def nprobe(self) -> int:
        """IVF clusters visited per query (0 for flat); raise it for recall, lower it for speed."""
        return self._vindex.params.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._vindex.params.nprobe = max(1, int(value))

    def get(self, tracklet_id: str) -> GalleryItem | None:
        """The metadata of an indexed tracklet, None when absent."""
        with self._lock.read():
            internal = self._id_of.get(tracklet_id)
            return None if internal is None else self._items[self._position(internal)]

    def tracklet_ids(self) -> list[str]:
        """Every indexed tracklet id, in insertion order."""
        with self._lock.read():
            return [item.tracklet_id for item in self._items]

    def _position(self, internal: int) -> int:
        return int(np.searchsorted(self._ids, internal))

    def vectors(self, tracklet_ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of ``tracklet_ids``, float32 [N, D] (re-ranking reads a shortlist's).

        Raises:
            KeyError: naming the ids that are not in the index.
        """
        if self._vindex.index_type == "ivf" and not getattr(self, "_direct_map", False):
            import faiss

            with self._lock.write():  # IVF lists need an id -> slot map; built once
                ivf = faiss.extract_index_ivf(self._vindex.index)
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
                self._direct_map = True
        with self._lock.read():
            missing = [t for t in tracklet_ids if t not in self._id_of]
            if missing:
                raise KeyError(f"{self.path}: tracklets not in the index: {missing[:5]}")
            ids = np.array([self._id_of[t] for t in tracklet_ids], dtype=np.int64)
            if self._vindex.keeps_exact:
                rows = np.searchsorted(self._vindex.exact_ids, ids)
                return np.asarray(self._vindex.exact, dtype=np.float32)[rows]
            if not len(ids):
                return np.zeros((0, self.dim), dtype=np.float32)
            return np.asarray(self._vindex.index.reconstruct_batch(ids), dtype=np.float32)

    def thumbnail(self, tracklet_id: str) -> bytes | None:
        """The tracklet's JPEG thumbnail, None when absent (unknown id or built without)."""
        with self._lock.read():
            internal = self._id_of.get(tracklet_id)
            if internal is None:
                return None
            if internal in self._pending_thumbs:
                return self._pending_thumbs[internal]
            where = self._thumb_at.get(internal)
            return None if where is None else self._read_blob(*where)

    def _read_blob(self, segment: str, offset: int, length: int) -> bytes:
        with self._fd_lock:
            fd = self._fds.get(segment)
            if fd is None:
                fd = self._fds[segment] = os.open(self.path / segment, os.O_RDONLY)
        return os.pread(fd, length, offset)

    def close(self) -> None:
        """Release open thumbnail files (the index stays usable; they reopen on demand)."""
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def stats(self) -> dict[str, Any]:
        """Counts per modality and camera, and what the index is (dim, metric, model, times)."""
        with self._lock.read():
            per_modality: dict[str, Any] = {}
            for modality in Modality:
                chosen = [it for it in self._items if it.modality == modality]
                cams = Counter(it.camid for it in chosen)
                names = {str(it.camid): it.camera for it in chosen if it.camera is not None}
                per_modality[modality.label] = {
                    "count": len(chosen),
                    "by_camid": {str(c): n for c, n in sorted(cams.items())},
                    "camera_names": dict(sorted(names.items())),
                }
            return {
                "path": str(self.path),
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "count": len(self._items),
                "per_modality": per_modality,
                "dim": self.dim,
                "metric": "inner_product",
                "similarity": self.similarity,
                "index_type": self.index_type,
                "index_params": self._vindex.params.to_dict(),
                "model_fingerprint": self.fingerprint,
                "model_method": self.model_config.get("method"),
                "thumbnails": len(self._thumb_at) + len(self._pending_thumbs),
                "generation": self._generation,
                "created": self._created,
                "updated": self._updated,
                "unsaved_changes": self._dirty,
                "device": self.device,
            }

    # ---- search --------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        modality: Modality | str | None = None,
        camids: Collection[int] | None = None,
    ) -> list[list[Hit]]:
        """The ``k`` best gallery items for each query vector, best first.

        ``modality`` is the *gallery* modality to search (None: all), ``camids`` the gallery
        cameras allowed (None: all). Every list holds exactly ``k`` hits when at least ``k``
        items match the filters, else all of them. Queries are L2-normalised for cosine indexes.

        Shape: queries [Q, D] (or [D]) -> Q lists of hits.
        """
        if isinstance(k, bool) or int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = self._prepare_vectors(np.asarray(queries, dtype=np.float32), "queries")
        wanted = None if modality is None else Modality.parse(modality)
        with self._lock.read():
            selection = self._selection(wanted, camids)
            scores, ids = self._vindex.search(queries, int(k), selection)
            positions = np.searchsorted(self._ids, np.maximum(ids, 0))
            return [
                self._hits(row_scores.tolist(), row_positions[row_ids >= 0].tolist())
                for row_scores, row_ids, row_positions in zip(scores, ids, positions, strict=True)
            ]

    def _hits(self, scores: list[float], positions: list[int]) -> list[Hit]:
        """Hits of one query; ``positions`` index ``_items`` (valid results are a prefix)."""
        hits = []
        for rank, (score, position) in enumerate(zip(scores, positions, strict=False), start=1):
            item = self._items[position]
            hits.append(
                Hit(
                    rank,
                    item.tracklet_id,
                    score,
                    item.modality,
                    item.camid,
                    item.camera,
                    item.pid,
                    item.timestamp,
                )
            )
        return hits

    def _selection(
        self, modality: Modality | None, camids: Collection[int] | None
    ) -> Selection | None:
        """The cached bitmap for a filter (None = no filter); built under the read lock."""
        if modality is None and camids is None:
            return None
        key = (modality, None if camids is None else frozenset(int(c) for c in camids))
        selection = self._selections.get(key)
        if selection is None:
            mask = np.ones(len(self._ids), dtype=bool)
            if modality is not None:
                mask &= self._modality == int(modality)
            if camids is not None:
                mask &= np.isin(self._camid, np.fromiter(key[1], dtype=np.int64, count=len(key[1])))
            selection = Selection(self._ids[mask], self._next_id)
            self._selections[key] = selection
        return selection

    def _prepare_vectors(self, vectors: np.ndarray, what: str) -> np.ndarray:
        """Check shape and finiteness; L2-normalise for cosine. Returns float32 [N, D]."""
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"{what} must be [N, {self.dim}], got {list(vectors.shape)}")
        bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        if len(bad):
            raise ValueError(f"{what}: rows {bad[:10].tolist()} hold NaN or infinite values")
        if self.similarity == "cosine":
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            if not np.allclose(norms, 1.0, atol=1e-4):  # encoder output already is: skip the copy
                vectors = vectors / np.maximum(norms, 1e-12)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    # ---- writing -------------------------------------------------------------------------

    def add(
        self,
        items: Sequence[GalleryItem],
        vectors: np.ndarray,
        thumbnails: Sequence[bytes | None] | None = None,
    ) -> None:
        """Add tracklets with their vectors (and optional JPEG thumbnails), in memory.

        Raises:
            ValueError: a malformed item or vector row, a length mismatch, or a tracklet id that
                is already indexed or repeated (the message names them); nothing is added then.
        """
        items = list(items)
        vectors = self._prepare_vectors(np.asarray(vectors, dtype=np.float32), "vectors")
        if len(vectors) != len(items):
            raise ValueError(f"{len(items)} items but {len(vectors)} vector rows")
        if thumbnails is not None and len(thumbnails) != len(items):
            raise ValueError(f"{len(items)} items but {len(thumbnails)} thumbnails")
        problems = [p for p in map(_check_item, items) if p]
        if problems:
            raise ValueError("invalid gallery items: " + "; ".join(problems[:10]))
        if not items:
            return
        with self._lock.write():
            self._add_locked(items, vectors, thumbnails)

    def _add_locked(
        self,
        items: list[GalleryItem],
        vectors: np.ndarray,
        thumbnails: Sequence[bytes | None] | None,
    ) -> None:
        counts = Counter(it.tracklet_id for it in items)
        dupes = sorted(
            {t for t, n in counts.items() if n > 1} | {t for t in counts if t in self._id_of}
        )
        if dupes:
            raise ValueError(f"tracklet id(s) already indexed or repeated: {', '.join(dupes[:20])}")
        ids = np.arange(self._next_id, self._next_id + len(items), dtype=np.int64)
        self._vindex.add(ids, vectors)  # first, so a training failure changes nothing
        self._next_id += len(items)
        self._ids = np.concatenate([self._ids, ids])
        self._modality = np.concatenate(
            [self._modality, [int(it.modality) for it in items]]
        ).astype(np.int8)
        self._camid = np.concatenate([self._camid, [int(it.camid) for it in items]]).astype(
            np.int64
        )
        for internal, item in zip(ids.tolist(), items, strict=True):
            self._items.append(
                GalleryItem(
                    tracklet_id=item.tracklet_id,
                    modality=item.modality,
                    camid=int(item.camid),
                    camera=item.camera,
                    pid=None if item.pid is None else int(item.pid),
                    timestamp=None if item.timestamp is None else float(item.timestamp),
                    frames=tuple(str(f) for f in item.frames),
                )
            )
            self._id_of[item.tracklet_id] = internal
        for internal, thumb in zip(ids.tolist(), thumbnails or (), strict=False):
            if thumb:
                self._pending_thumbs[internal] = bytes(thumb)
        self._changed()

    def remove(self, tracklet_ids: Sequence[str]) -> int:
        """Remove tracklets (in memory); returns how many were removed.

        All or nothing: if any id is not indexed, nothing is removed.

        Raises:
            KeyError: naming the ids that are not in the index.
        """
        wanted = list(dict.fromkeys(tracklet_ids))
        with self._lock.write():
            missing = [t for t in wanted if t not in self._id_of]
            if missing:
                raise KeyError(
                    f"not in the index: {', '.join(map(str, missing[:20]))}"
                    + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
                )
            if not wanted:
                return 0
            gone = np.asarray(sorted(self._id_of.pop(t) for t in wanted), dtype=np.int64)
            self._vindex.remove(gone)
            keep = ~np.isin(self._ids, gone)
            self._items = [it for it, k in zip(self._items, keep, strict=True) if k]
            self._ids, self._modality, self._camid = (
                self._ids[keep],
                self._modality[keep],
                self._camid[keep],
            )
            for internal in gone.tolist():
                self._thumb_at.pop(internal, None)
                self._pending_thumbs.pop(internal, None)
            self._changed()
            return len(gone)

    def _changed(self) -> None:
        self._selections.clear()
        self._dirty = True
        self._updated = _now()

    def save(self) -> None:
        """Persist the index atomically (see the module docstring for the protocol).

        Raises:
            IndexConflictError: another writer saved this folder since it was opened here.
            OSError: the disk refused a write; the previous index on disk is untouched then.
        """
        with self._lock.write(), files.folder_lock(self.path):
            on_disk = (
                _read_header(self.path).get("generation", 0)
                if (self.path / MANIFEST).exists()
                else 0
            )
            if on_disk != self._generation:
                raise IndexConflictError(
                    f"{self.path}: saved by another writer (generation {on_disk}, this copy has "
                    f"{self._generation}); reopen the index and apply the change again"
                )
            generation = self._generation + 1
            listed, thumb_at, segments = self._write_data(generation)
            header = self._header(generation, listed)
            manifest = json.dumps(header, indent=2).encode()
            files.write_bytes_atomic(self.path / MANIFEST, manifest, sync_dir=False)
            # Committed by the rename. Bookkeeping and tidying up remain; neither fails the save.
            self._generation = generation
            self._thumb_at, self._segments = thumb_at, segments
            self._pending_thumbs.clear()
            self._dirty = False
            try:
                files.fsync_dir(self.path)
                self._remove_unlisted(header)
            except OSError as exc:
                log.warning(
                    "index %s saved, but tidying up failed (%s); unused files remain",
                    self.path,
                    exc,
                )
            log.info(
                "saved index %s (generation %d, %d tracklets)", self.path, generation, len(self)
            )

    def _write_data(
        self, gen: int
    ) -> tuple[dict[str, Any], dict[int, tuple[str, int, int]], dict[str, Any]]:
        """Write the data files of generation ``gen``; returns (entries, thumb map, segments)."""
        thumb_at, segments = self._write_thumbnails(gen)
        listed: dict[str, Any] = {}
        index_name = f"index.{gen:06d}.faiss"
        files.write_atomic(self.path / index_name, self._vindex.write_index)
        listed["index"] = _entry(self.path, index_name)
        items_name = f"items.{gen:06d}.jsonl"
        files.write_stream_atomic(self.path / items_name, lambda fh: self._dump_items(fh, thumb_at))
        listed["items"] = _entry(self.path, items_name)
        if self._vindex.keeps_exact:
            vectors_name = f"vectors.{gen:06d}.npy"
            exact = np.asarray(self._vindex.exact, dtype=np.float32)
            files.write_stream_atomic(self.path / vectors_name, lambda fh: np.save(fh, exact))
            listed["vectors"] = _entry(self.path, vectors_name)
        listed["thumbnails"] = list(segments.values())
        return listed, thumb_at, segments

    def _write_thumbnails(self, gen: int) -> tuple[dict[int, tuple[str, int, int]], dict[str, Any]]:
        """New segment of pending thumbnails (all live ones when compacting); memory unchanged."""
        live = dict(self._thumb_at)
        used = Counter(loc[0] for loc in live.values())
        total = sum(int(self._segments[name]["bytes"]) for name in used)
        live_bytes = sum(loc[2] for loc in live.values())
        compact = total >= _COMPACT_MIN_BYTES and live_bytes * 2 < total
        blobs = dict(self._pending_thumbs)
        if compact:
            blobs.update({i: self._read_blob(*loc) for i, loc in live.items()})
            live = {}
        segments = {name: self._segments[name] for name in used if not compact}
        if blobs:
            name = f"thumbs.{gen:06d}.bin"
            order = sorted(blobs)
            offsets = np.cumsum([0] + [len(blobs[i]) for i in order]).tolist()

            def fill(handle: Any) -> None:
                for internal in order:
                    handle.write(blobs[internal])

            files.write_stream_atomic(self.path / name, fill)
            live.update({i: (name, offsets[n], len(blobs[i])) for n, i in enumerate(order)})
            segments[name] = _entry(self.path, name)
        return live, segments

    def _dump_items(self, handle: Any, thumb_at: dict[int, tuple[str, int, int]]) -> None:
        for internal, item in zip(self._ids.tolist(), self._items, strict=True):
            record = {"id": internal, **item.to_dict(), "thumb": thumb_at.get(internal)}
            handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    def _header(self, generation: int, listed: dict[str, Any]) -> dict[str, Any]:
        counts = Counter(it.modality.label for it in self._items)
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "generation": generation,
            "dim": self.dim,
            "metric": "inner_product",
            "similarity": self.similarity,
            "index_type": self.index_type,
            "index_params": self._vindex.params.to_dict(),
            "model_fingerprint": self.fingerprint,
            "model_config": self.model_config,
            "count": len(self._items),
            "counts": {m.label: counts.get(m.label, 0) for m in Modality},
            "next_id": self._next_id,
            "created": self._created,
            "updated": self._updated,
            "files": listed,
        }

    def _remove_unlisted(self, header: dict[str, Any]) -> None:
        """Delete data files of older generations and temp files of interrupted writes."""
        listed = header["files"]
        keep = {listed["index"]["name"], listed["items"]["name"]}
        keep |= {e["name"] for e in listed["thumbnails"]}
        keep |= {listed["vectors"]["name"]} if "vectors" in listed else set()
        with self._fd_lock:
            for name in [n for n in self._fds if n not in keep]:
                os.close(self._fds.pop(name))
        for entry in self.path.iterdir():
            stale_tmp = entry.name.startswith(".") and entry.name.endswith(".tmp")
            if (
                (stale_tmp or _DATA_FILE.match(entry.name))
                and entry.name not in keep
                and entry.is_file()
            ):
                files.remove_quietly(entry)
        files.fsync_dir(self.path)


def _entry(folder: Path, name: str) -> dict[str, Any]:
    file = folder / name
    return {"name": name, "sha256": files.sha256_file(file), "bytes": file.stat().st_size}


def _verify_file(folder: Path, entry: dict[str, Any]) -> None:
    file = folder / entry["name"]
    if not file.is_file():
        raise FileNotFoundError(2, "missing", str(file))
    found = files.sha256_file(file)
    if found != entry["sha256"]:
        raise IndexFormatError(
            f"{file}: checksum mismatch (manifest sha256 {entry['sha256'][:12]}..., file "
            f"{found[:12]}...): the file is corrupted or was changed; rebuild the index"
        )


def _load_vectors(file: Path, count: int, dim: int) -> np.ndarray:
    try:
        vectors = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise IndexFormatError(f"{file}: not a readable vector file ({exc})") from None
    if vectors.shape != (count, dim) or vectors.dtype != np.float32:
        raise IndexFormatError(
            f"{file}: expected float32 [{count}, {dim}], "
            f"found {vectors.dtype} {list(vectors.shape)}"
        )
    return vectors


_REQUIRED = (
    "format",
    "format_version",
    "generation",
    "dim",
    "similarity",
    "index_type",
    "model_fingerprint",
    "files",
)


def _read_header(path: Path) -> dict[str, Any]:
    """Parse and validate ``manifest.json`` of an index folder."""
    file = path / MANIFEST
    if not path.is_dir():
        raise IndexFormatError(f"{path}: no such index folder")
    try:
        header = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFormatError(
            f"{file}: missing; {path} is not a vvireid index (or its build never finished)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFormatError(f"{file}: not a readable index manifest ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise IndexFormatError(f"{file}: not a vvireid index manifest")
    missing = [key for key in _REQUIRED if key not in header]
    if missing:
        raise IndexFormatError(f"{file}: missing field(s) {', '.join(missing)}")
    if header["format_version"] != FORMAT_VERSION:
        raise IndexFormatError(
            f"{file}: index format version {header['format_version']} is not supported "
            f"(this vvireid reads version {FORMAT_VERSION}); rebuild the index"
        )
    if header["index_type"] not in INDEX_TYPES or header["similarity"] not in SIMILARITIES:
        raise IndexFormatError(f"{file}: unknown index_type or similarity")
    listed = header["files"]
    if not isinstance(listed, dict) or "index" not in listed or "items" not in listed:
        raise IndexFormatError(f"{file}: files: must list 'index' and 'items'")
    entries = [listed["index"], listed["items"], *listed.get("thumbnails", [])]
    entries += [listed["vectors"]] if "vectors" in listed else []
    for entry in entries:
        if not (
            isinstance(entry, dict) and isinstance(entry.get("name"), str) and "sha256" in entry
        ):
            raise IndexFormatError(f"{file}: files: malformed entry {entry!r}")
        if "/" in entry["name"] or entry["name"].startswith("."):
            raise IndexFormatError(f"{file}: files: {entry['name']!r} is not a plain file name")
    return header


def _check_model(
    path: Path, header: dict[str, Any], fingerprint: str | None, dim: int | None
) -> None:
    if fingerprint is not None and header["model_fingerprint"] != fingerprint:
        method = (header.get("model_config") or {}).get("method", "?")
        raise IndexMismatchError(
            f"{path}: built with model {header['model_fingerprint']} ({method}), but the "
            f"checkpoint given has fingerprint {fingerprint}; features of different models are "
            f"not comparable - rebuild the index with this checkpoint or use the one it was "
            f"built with"
        )
    if dim is not None and int(header["dim"]) != int(dim):
        raise IndexMismatchError(
            f"{path}: holds {header['dim']}-d vectors, the model produces {dim}-d"
        )
