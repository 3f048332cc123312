"""``GalleryIndex``: the live gallery of encoded tracklets that the server searches.

Folder layout (format 2)::

    gallery.sqlite3 (+ -wal, -shm)   the source of truth (see :mod:`vvireid.indexer.db`):
                                     metadata, float32 vectors, JPEG thumbnails, change log
    snapshot.faiss                   the FAISS index as of one change ``seq`` (written in the
                                     background or by :meth:`GalleryIndex.save`), so that an
                                     open does not rebuild it; see ``_write_snapshot``

Writes: :meth:`add` and :meth:`remove` are each ONE SQLite transaction (cost O(change), never a
rewrite of the gallery) and return only after it has committed. The in-memory FAISS index and
metadata are then brought up to the database by replaying the change log; the readers-writer
lock is held only for that in-memory update, so searches never wait for disk.

Reads: the FAISS index is derived data. :meth:`open` loads the snapshot, checks its checksum and
replays the changes committed after it; a missing, stale or corrupt snapshot is logged and the
index rebuilt from the database. Several processes may open one gallery: SQLite serialises their
writes, and :meth:`refresh` (run by :meth:`start_background` every ``poll_s``) applies what other
processes committed, noticed through ``PRAGMA data_version``.

Index folders of format 1 (``manifest.json`` + generation files) are converted once, at the first
:meth:`open` (see :mod:`vvireid.indexer.legacy`); the old files are deleted only after the new
database has committed.

Thread safety: any number of threads may ``search``/``get``/``thumbnail``; writers in one process
are serialised by a mutex (never held by readers) and hold the write side of the lock only while
the in-memory state changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from vvireid.indexer import db
from vvireid.indexer.backend import (
    INDEX_TYPES,
    IndexParams,
    Selection,
    VectorIndex,
    configure_faiss,
    min_train_size,
    prepare_vectors,
)
from vvireid.indexer.db import (
    DB_NAME,
    FORMAT,
    FORMAT_VERSION,
    GalleryBusyError,
    GalleryWriteError,
    IndexConflictError,
    IndexFormatError,
    IndexMismatchError,
)
from vvireid.model import fileio as files
from vvireid.model.concurrency import ReadWriteLock
from vvireid.model.types import Modality

__all__ = [
    "DB_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "GalleryBusyError",
    "GalleryIndex",
    "GalleryItem",
    "GalleryWriteError",
    "Hit",
    "IndexConflictError",
    "IndexFormatError",
    "IndexMismatchError",
    "TrackletExistsError",
]

log = logging.getLogger(__name__)

SIMILARITIES = ("cosine", "inner_product")
SNAPSHOT = "snapshot.faiss"
LEGACY_MANIFEST = "manifest.json"
_SNAPSHOT_MAGIC = b"VVIREID-SNAPSHOT\n"
_SNAPSHOT_HEADER = 4096  # fixed-size JSON header before the FAISS bytes
_READ_CHUNK = 20_000  # vectors read per batch when rebuilding
CHANGES_KEPT = 10_000  # change-log rows kept behind the snapshot for readers that lag


class TrackletExistsError(ValueError):
    """A tracklet id to add is already in the gallery (or repeated within the request)."""


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


def _normal_item(item: GalleryItem) -> GalleryItem:
    return GalleryItem(
        tracklet_id=item.tracklet_id,
        modality=item.modality,
        camid=int(item.camid),
        camera=item.camera,
        pid=None if item.pid is None else int(item.pid),
        timestamp=None if item.timestamp is None else float(item.timestamp),
        frames=tuple(str(f) for f in item.frames),
    )


def _item_from_row(row: tuple) -> tuple[int, GalleryItem]:
    internal, tracklet_id, modality, camid, camera, pid, timestamp, frames = row
    item = GalleryItem(
        tracklet_id=str(tracklet_id),
        modality=Modality(int(modality)),
        camid=int(camid),
        camera=camera,
        pid=None if pid is None else int(pid),
        timestamp=None if timestamp is None else float(timestamp),
        frames=tuple(json.loads(frames or "[]")),
    )
    return int(internal), item


@dataclass
class _Memory:
    """The in-memory, derived side of the gallery as of change ``seq``: FAISS + metadata."""

    vindex: VectorIndex
    seq: int = 0
    items: dict[int, GalleryItem] = field(default_factory=dict)
    id_of: dict[str, int] = field(default_factory=dict)
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    modality: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    camid: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    selections: dict[tuple[Any, ...], Selection] = field(default_factory=dict)

    def set_items(self, rows: list[tuple[int, GalleryItem]]) -> None:
        self.items = dict(rows)
        self.id_of = {item.tracklet_id: internal for internal, item in rows}
        self.ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        self.modality = np.fromiter((int(r[1].modality) for r in rows), np.int8, len(rows))
        self.camid = np.fromiter((r[1].camid for r in rows), np.int64, len(rows))
        self.selections.clear()

    def apply(
        self, removed: np.ndarray, added: list[tuple[int, GalleryItem]], vectors: np.ndarray
    ) -> None:
        """Remove then add (ids are never reused, so the order cannot matter otherwise)."""
        if len(vectors):
            self.vindex.add(np.fromiter((a[0] for a in added), np.int64, len(added)), vectors)
        gone = [i for i in removed.tolist() if i in self.items]
        if gone:
            self.vindex.remove(np.asarray(gone, dtype=np.int64))
            for internal in gone:
                del self.id_of[self.items.pop(internal).tracklet_id]
            keep = ~np.isin(self.ids, gone)
            self.ids, self.modality, self.camid = self.ids[keep], self.modality[keep], self.camid[keep]
        if added:
            for internal, item in added:
                self.items[internal] = item
                self.id_of[item.tracklet_id] = internal
            self.ids = np.concatenate([self.ids, [a[0] for a in added]]).astype(np.int64)
            self.modality = np.concatenate(
                [self.modality, [int(a[1].modality) for a in added]]
            ).astype(np.int8)
            self.camid = np.concatenate([self.camid, [a[1].camid for a in added]]).astype(np.int64)
        if gone or added:
            self._update_selections(added, np.asarray(gone, dtype=np.int64))

    def _update_selections(
        self, added: list[tuple[int, GalleryItem]], gone: np.ndarray
    ) -> None:
        """Keep the cached filter bitmaps current (a rebuild per write would cost every query
        after a write an O(N) pass); a bitmap that has no room for a new id is dropped."""
        for key in list(self.selections):
            modality, cams = key
            matching = np.asarray(
                [
                    i for i, it in added
                    if (modality is None or it.modality == modality)
                    and (cams is None or it.camid in cams)
                ],
                dtype=np.int64,
            )
            if not self.selections[key].update(matching, gone):
                del self.selections[key]


class GalleryIndex:
    """A persistent, searchable, live gallery of tracklet vectors; see the module docstring.

    Make one with :meth:`create`, load one with :meth:`open`. Every :meth:`add`/:meth:`remove`
    is committed to disk before it returns; :meth:`save` only writes a FAISS snapshot now.
    """

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        conn: sqlite3.Connection | None,
        memory: _Memory,
        *,
        synchronous: str = "FULL",
    ) -> None:
        self.path = path
        self.db_file = path / DB_NAME
        self.dim: int = int(meta["dim"])
        self.fingerprint: str = str(meta["model_fingerprint"])
        self.similarity: str = str(meta["similarity"])
        self.index_type: str = str(meta["index_type"])
        self.model_config: dict[str, Any] = dict(meta.get("model_config") or {})
        self._created = str(meta.get("created") or _now())
        self._nprobe = int(meta.get("nprobe") or 0)
        self._synchronous = synchronous
        self._conn = conn  # writes and change replay; used under _mutex only (None until created)
        self._read_conn: sqlite3.Connection | None = None  # thumbnails, re-ranking vectors
        self._read_lock = threading.Lock()
        self._mutex = threading.RLock()  # one writer / replayer at a time in this process
        self._lock = ReadWriteLock()  # readers vs the in-memory update
        self._mem = memory
        self._hook(memory)
        # create(): nothing is written before the first commit, and with overwrite the old
        # gallery stays as it was until then.
        self._pending_init = False
        self._pending_reset = False
        self._meta_for_reset: dict[str, Any] = {}
        self._reset_seq: int | None = None
        self._data_version: int | None = None
        self._snapshot_seq = -1
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._closed = False

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
        synchronous: str = "FULL",
    ) -> GalleryIndex:
        """A new, empty gallery for ``path``; nothing is written before the first :meth:`add`
        (or :meth:`save`), whose transaction creates the database, so an interrupted build
        leaves no half-made gallery behind.

        With ``overwrite`` an existing gallery in ``path`` stays loadable and unchanged until
        that first commit, which replaces its content in the same transaction.

        Raises:
            ValueError: bad dim, similarity or index type.
            FileExistsError: ``path`` already holds a gallery and ``overwrite`` is False.
        """
        if index_type not in INDEX_TYPES:
            raise ValueError(f"unknown index type {index_type!r}; known: {', '.join(INDEX_TYPES)}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {similarity!r}; known: {', '.join(SIMILARITIES)}")
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        path = Path(path)
        file = path / DB_NAME
        has_db = file.exists() and _has_schema(file)
        if (has_db or (path / LEGACY_MANIFEST).exists()) and not overwrite:
            raise FileExistsError(f"{path}: already holds an index (overwrite it explicitly)")
        configure_faiss()
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dim": int(dim),
            "similarity": similarity,
            "index_type": index_type,
            "nprobe": int(nprobe or 0),
            "model_fingerprint": model_fingerprint,
            "model_config": model_config or {},
            "created": _now(),
            "updated": _now(),
        }
        vindex = VectorIndex(index_type, int(dim), IndexParams(nprobe=nprobe or 0))
        index = cls(path, meta, None, _Memory(vindex), synchronous=synchronous)
        index._meta_for_reset = meta
        if has_db:
            index._pending_reset = True
            index._mem.seq = db.last_seq(index._db())
        else:
            index._pending_init = True
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
        synchronous: str = "FULL",
    ) -> GalleryIndex:
        """Open a gallery: check the model, load the snapshot, replay newer changes.

        A format-1 folder is converted first (logged). ``verify`` checks the snapshot's
        checksum (a corrupt snapshot is never trusted: the index is rebuilt instead).

        Raises:
            IndexFormatError: not a gallery, or an unreadable database (the message names it).
            IndexMismatchError: ``expected_fingerprint``/``expected_dim`` differ from the index's.
        """
        path = Path(path)
        if not path.is_dir():
            raise IndexFormatError(f"{path}: no such index folder")
        file = path / DB_NAME
        if not file.exists():
            if (path / LEGACY_MANIFEST).exists():
                from vvireid.indexer.legacy import migrate

                migrate(path)
            else:
                raise IndexFormatError(
                    f"{path / DB_NAME}: missing; {path} is not a vvireid index (or its build "
                    "never finished)"
                )
        configure_faiss()
        conn = db.connect(file, synchronous=synchronous)
        try:
            meta = db.read_meta(conn, file)
            db.check_model(path, meta, expected_fingerprint, expected_dim)
            params = IndexParams(nprobe=int(nprobe or meta.get("nprobe") or 0))
            memory = _Memory(VectorIndex(str(meta["index_type"]), int(meta["dim"]), params))
            index = cls(path, meta, conn, memory, synchronous=synchronous)
            index._mem = index._load_memory(verify=verify)
            index._hook(index._mem)
        except BaseException:
            conn.close()
            raise
        if nprobe:
            index.nprobe = int(nprobe)
        index._select_device(device)
        log.info("opened index %s: %d tracklets (%s)", path, len(index), index.index_type)
        return index

    def _db(self) -> sqlite3.Connection:
        """The writer connection (created with the folder on the first commit of a new one)."""
        if self._conn is None:
            self.path.mkdir(parents=True, exist_ok=True)
            self._conn = db.connect(self.db_file, synchronous=self._synchronous)
        return self._conn

    def _hook(self, memory: _Memory) -> None:
        memory.vindex.fetch_exact = self._fetch_exact
        if self._nprobe and not memory.vindex.params.nprobe:
            memory.vindex.params.nprobe = self._nprobe

    def _select_device(self, device: str) -> None:
        """Where searches run: FAISS-GPU, else exact torch search on CUDA (flat), else CPU FAISS.

        Never refuses a CUDA device for lack of FAISS GPU support: the encoder's device and the
        search's are independent. The choice is logged and reported in ``stats()``.
        """
        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda")
        self._device = device
        self._torch_device: torch.device | None = None
        if device != "cpu" and torch.cuda.is_available():
            self._torch_device = torch.device("cuda" if device == "auto" else device)
        self.search_device = "cpu"
        if device != "cpu":
            self._place(self._mem.vindex)
        if device.startswith("cuda") and self.search_device == "cpu":
            log.warning(
                "%s: device %s requested, but neither FAISS nor torch can search on a GPU here "
                "(%s index); searching on the CPU", self.path, device, self.index_type
            )
        log.info("%s: searches run on %s", self.path, self.search_device)

    def _place(self, vindex: VectorIndex) -> None:
        """Apply the search-device choice to a (new) in-memory index."""
        if getattr(self, "_device", "cpu") != "cpu":
            self.search_device = vindex.enable_gpu(self._torch_device)

    # ---- loading -------------------------------------------------------------------------

    def _load_memory(self, *, verify: bool = True, retrain: bool = False) -> _Memory:
        """Metadata and FAISS index as of one consistent database view, snapshot when usable."""
        conn = db.connect(self.db_file, synchronous=self._synchronous)
        try:
            with db.read_transaction(conn, self.db_file):
                seq = db.last_seq(conn)
                rows = [_item_from_row(r) for r in db.fetch_item_rows(conn)]
                vindex = None if retrain else self._load_snapshot(conn, seq, rows, verify)
                if vindex is None:
                    vindex = self._rebuild(conn, [r[0] for r in rows], train=retrain)
        finally:
            conn.close()
        memory = _Memory(vindex, seq=seq)
        memory.set_items(rows)
        self._hook(memory)
        return memory

    def _load_snapshot(
        self, conn: sqlite3.Connection, seq: int, rows: list[tuple[int, GalleryItem]], verify: bool
    ) -> VectorIndex | None:
        """The snapshot brought up to ``seq`` by replaying the change log, or None (logged)."""
        file = self.path / SNAPSHOT
        if not file.exists():
            if rows:
                log.warning("%s: no FAISS snapshot; rebuilding the index from the database", file)
            return None
        try:
            header, vindex = _read_snapshot(file, self, verify)
            if header["seq"] > seq:
                raise ValueError(f"it covers change {header['seq']}, the database ends at {seq}")
            if header["seq"] < db.pruned_through(conn):
                raise ValueError("the change log after it has been pruned")
            _, changes = db.changes_since(conn, int(header["seq"]))
            if any(op == "reset" for op, _ in changes):
                raise ValueError("the gallery was replaced after it was written")
            added, removed = _net_changes(changes)
            live = {r[0] for r in rows}
            vindex.remove(np.asarray(sorted(removed), dtype=np.int64))
            fresh = [i for i in added if i in live]
            _add_stored(conn, self.db_file, vindex, fresh, self.dim)
            if vindex.ntotal != len(rows):
                raise ValueError(f"{vindex.ntotal} vectors after replay, {len(rows)} in the database")
        except (IndexFormatError, ValueError, RuntimeError, OSError) as exc:
            log.warning(
                "%s: snapshot unusable (%s); rebuilding the index from the database", file, exc
            )
            return None
        log.info("loaded snapshot %s (change %d) and replayed to change %d", file, header["seq"], seq)
        self._snapshot_seq = int(header["seq"])
        return vindex

    def _rebuild(self, conn: sqlite3.Connection, ids: list[int], *, train: bool) -> VectorIndex:
        """A fresh FAISS index of every stored vector (IVF types are trained on them first)."""
        started = time.perf_counter()
        params = IndexParams(nprobe=self._nprobe)
        vindex = VectorIndex(self.index_type, self.dim, params)
        if min_train_size(self.index_type) and ids:
            sample = ids if len(ids) <= 100_000 else ids[:: max(1, len(ids) // 100_000)]
            found = db.fetch_vectors(conn, sample, self.dim)
            vindex.train(np.stack([found[i] for i in sample if i in found]))
        _add_stored(conn, self.db_file, vindex, ids, self.dim)
        if ids:
            log.info(
                "built the %s index of %d vectors from %s in %.1f s%s",
                self.index_type, len(ids), self.db_file, time.perf_counter() - started,
                " (retrained)" if train else "",
            )
        return vindex

    # ---- reading -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._mem.items)

    def __contains__(self, tracklet_id: object) -> bool:
        return tracklet_id in self._mem.id_of

    def __enter__(self) -> GalleryIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def device(self) -> str:
        """``cuda`` when searches run on a GPU (FAISS-GPU or torch), else ``cpu``."""
        return "cpu" if self.search_device == "cpu" else "cuda"

    @property
    def nprobe(self) -> int:
        """IVF clusters visited per query (0 for flat); raise it for recall, lower it for speed."""
        return self._mem.vindex.params.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._nprobe = max(1, int(value))
        self._mem.vindex.params.nprobe = self._nprobe

    @property
    def change_seq(self) -> int:
        """The last committed change this process has applied (grows with every write)."""
        return self._mem.seq

    def get(self, tracklet_id: str) -> GalleryItem | None:
        """The metadata of an indexed tracklet, None when absent."""
        with self._lock.read():
            internal = self._mem.id_of.get(tracklet_id)
            return None if internal is None else self._mem.items[internal]

    def tracklet_ids(self) -> list[str]:
        """Every indexed tracklet id, in insertion order."""
        with self._lock.read():
            memory = self._mem
            return [memory.items[i].tracklet_id for i in sorted(memory.items)]

    def vectors(self, tracklet_ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of ``tracklet_ids`` in that order, float32 [N, D], read from the
        database (exact for every index type; re-ranking and merges read a shortlist's).

        Raises:
            KeyError: naming the ids that are not in the index.
        """
        memory = self._mem
        missing = [t for t in tracklet_ids if t not in memory.id_of]
        if missing:
            raise KeyError(f"{self.path}: tracklets not in the index: {missing[:5]}")
        ids = np.asarray([memory.id_of[t] for t in tracklet_ids], dtype=np.int64)
        if not len(ids):
            return np.zeros((0, self.dim), dtype=np.float32)
        found = self._fetch_exact(ids)
        gone = [t for t, i in zip(tracklet_ids, ids.tolist(), strict=True) if i not in found]
        if gone:  # removed by a commit this process has not applied yet
            raise KeyError(f"{self.path}: tracklets not in the index: {gone[:5]}")
        return np.stack([found[i] for i in ids.tolist()]).astype(np.float32)

    def thumbnail(self, tracklet_id: str) -> bytes | None:
        """The tracklet's JPEG thumbnail, None when absent (unknown id or built without).

        Read from the database by internal id (never a path a client could choose).
        """
        internal = self._mem.id_of.get(tracklet_id)
        if internal is None:
            return None
        row = self._read("SELECT jpeg FROM thumbnails WHERE id = ?", (internal,))
        return None if not row else bytes(row[0][0])

    def _read(self, sql: str, args: Sequence[Any]) -> list[tuple]:
        """One SELECT on the shared read connection (opened lazily, closed by :meth:`close`)."""
        if self._pending_init:
            return []  # created, nothing committed yet: no database to read
        with self._read_lock:
            if self._read_conn is None:
                self._read_conn = db.connect(self.db_file, synchronous=self._synchronous)
            try:
                return self._read_conn.execute(sql, list(args)).fetchall()
            except sqlite3.Error as exc:
                raise db.translate(exc, self.db_file, "read the gallery") from None

    def _fetch_exact(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        with self._read_lock:
            if self._read_conn is None:
                self._read_conn = db.connect(self.db_file, synchronous=self._synchronous)
            return db.fetch_vectors(self._read_conn, ids.tolist(), self.dim)

    def stats(self) -> dict[str, Any]:
        """Counts per modality and camera, and what the index is (dim, metric, model, times)."""
        with self._lock.read():
            memory = self._mem
            items = list(memory.items.values())
            params = memory.vindex.params.to_dict()
            seq = memory.seq
        per_modality: dict[str, Any] = {}
        for modality in Modality:
            chosen = [it for it in items if it.modality == modality]
            cams = Counter(it.camid for it in chosen)
            names = {str(it.camid): it.camera for it in chosen if it.camera is not None}
            per_modality[modality.label] = {
                "count": len(chosen),
                "by_camid": {str(c): n for c, n in sorted(cams.items())},
                "camera_names": dict(sorted(names.items())),
            }
        updated = self._read("SELECT value FROM meta WHERE key = 'updated'", ())
        thumbs = sum(r[0] for r in self._read("SELECT count(*) FROM thumbnails", ()))
        return {
            "path": str(self.path),
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "count": len(items),
            "per_modality": per_modality,
            "dim": self.dim,
            "metric": "inner_product",
            "similarity": self.similarity,
            "index_type": self.index_type,
            "index_params": params,
            "model_fingerprint": self.fingerprint,
            "model_method": self.model_config.get("method"),
            "thumbnails": int(thumbs),
            "change_seq": seq,
            "snapshot_seq": self._snapshot_seq,
            "synchronous": self._synchronous,
            "created": self._created,
            "updated": json.loads(updated[0][0]) if updated else None,
            "device": self.device,
            "search_device": self.search_device,
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
            memory = self._mem
            selection = self._selection(memory, wanted, camids)
            scores, ids = memory.vindex.search(queries, int(k), selection)
            return [
                self._hits(memory, row_scores.tolist(), row_ids[row_ids >= 0].tolist())
                for row_scores, row_ids in zip(scores, ids, strict=True)
            ]

    @staticmethod
    def _hits(memory: _Memory, scores: list[float], ids: list[int]) -> list[Hit]:
        """Hits of one query (valid results are a prefix of the row)."""
        hits = []
        for rank, (score, internal) in enumerate(zip(scores, ids, strict=False), start=1):
            item = memory.items[internal]
            hits.append(
                Hit(
                    rank, item.tracklet_id, score, item.modality, item.camid, item.camera,
                    item.pid, item.timestamp,
                )
            )
        return hits

    @staticmethod
    def _selection(
        memory: _Memory, modality: Modality | None, camids: Collection[int] | None
    ) -> Selection | None:
        """The cached bitmap for a filter (None = no filter); built under the read lock."""
        if modality is None and camids is None:
            return None
        key = (modality, None if camids is None else frozenset(int(c) for c in camids))
        selection = memory.selections.get(key)
        if selection is None:
            mask = np.ones(len(memory.ids), dtype=bool)
            if modality is not None:
                mask &= memory.modality == int(modality)
            if camids is not None:
                mask &= np.isin(memory.camid, np.fromiter(key[1], dtype=np.int64, count=len(key[1])))
            bound = int(memory.ids.max()) + 1 if len(memory.ids) else 1
            # Headroom: later adds (new, larger ids) set bits in place instead of a rebuild.
            selection = Selection(memory.ids[mask], bound, headroom=max(4096, bound // 8))
            memory.selections[key] = selection
        return selection

    def _prepare_vectors(self, vectors: np.ndarray, what: str) -> np.ndarray:
        return prepare_vectors(vectors, self.dim, self.similarity, what)

    # ---- writing -------------------------------------------------------------------------

    def add(
        self,
        items: Sequence[GalleryItem],
        vectors: np.ndarray,
        thumbnails: Sequence[bytes | None] | None = None,
    ) -> None:
        """Add tracklets with their vectors (and optional JPEG thumbnails), committed at once.

        One transaction for the whole call: when this returns, the change is on disk (and
        visible to other processes); when it raises, nothing was added, in memory or on disk.

        Raises:
            ValueError: a malformed item or vector row, a length mismatch, or too few vectors to
                train an IVF index (the message names them); TrackletExistsError (a ValueError)
                for a tracklet id that is already indexed or repeated.
            GalleryBusyError: another process kept the database locked past the busy timeout.
            GalleryWriteError: the disk refused the write (full, read-only).
        """
        items = [_normal_item(it) if not _check_item(it) else it for it in items]
        vectors = self._prepare_vectors(np.asarray(vectors, dtype=np.float32), "vectors")
        if len(vectors) != len(items):
            raise ValueError(f"{len(items)} items but {len(vectors)} vector rows")
        if thumbnails is not None and len(thumbnails) != len(items):
            raise ValueError(f"{len(items)} items but {len(thumbnails)} thumbnails")
        problems = [p for p in map(_check_item, items) if p]
        if problems:
            raise ValueError("invalid gallery items: " + "; ".join(problems[:10]))
        counts = Counter(it.tracklet_id for it in items)
        repeated = sorted(t for t, n in counts.items() if n > 1)
        if repeated:
            raise TrackletExistsError(f"tracklet id(s) repeated: {', '.join(repeated[:20])}")
        if not items and not (self._pending_reset or self._pending_init):
            return
        with self._mutex:
            self._check_trainable(len(items))
            with self._writing("add tracklets"):
                self._reset_if_pending()
                ids = self._insert(items, vectors, thumbnails)
                self._log_change("add", ids)
            self._after_commit(("add", ids, items, vectors))

    def _check_trainable(self, adding: int) -> None:
        """Refuse before writing when an untrained IVF index could not train on the gallery."""
        need = min_train_size(self.index_type)
        have = len(self) + adding
        if need and not self._mem.vindex.is_trained and have < need:
            raise ValueError(
                f"an {self.index_type} index needs at least {need} vectors to train, got "
                f"{have}; use index type 'flat' (exact, fine up to a few million tracklets)"
            )

    @contextlib.contextmanager
    def _writing(self, doing: str) -> Any:
        if self._closed:
            raise RuntimeError(f"{self.path}: the gallery is closed")
        with db.write_transaction(self._db(), self.db_file, doing):
            yield
            db.write_meta(self._db(), {"updated": _now()})

    def _insert(
        self,
        items: list[GalleryItem],
        vectors: np.ndarray,
        thumbnails: Sequence[bytes | None] | None,
    ) -> list[int]:
        conn = self._conn
        wanted = [it.tracklet_id for it in items]
        taken: list[str] = []
        for part in db.chunks(wanted):
            marks = ",".join("?" * len(part))
            taken += [
                r[0]
                for r in conn.execute(
                    f"SELECT tracklet_id FROM tracklets WHERE tracklet_id IN ({marks})", list(part)
                )
            ]
        if taken:
            raise TrackletExistsError(
                f"tracklet id(s) already indexed: {', '.join(sorted(taken)[:20])}"
            )
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'tracklets'").fetchone()
        first = int(row[0] if row else 0) + 1  # AUTOINCREMENT: ids are never reused
        ids = list(range(first, first + len(items)))
        conn.executemany(
            f"INSERT INTO tracklets({db.ITEM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    internal, it.tracklet_id, int(it.modality), it.camid, it.camera, it.pid,
                    it.timestamp, json.dumps(list(it.frames), ensure_ascii=False),
                )
                for internal, it in zip(ids, items, strict=True)
            ],
        )
        conn.executemany(
            "INSERT INTO vectors(id, vector) VALUES (?, ?)",
            [(i, db.vector_blob(v)) for i, v in zip(ids, vectors, strict=True)],
        )
        if thumbnails is not None:
            conn.executemany(
                "INSERT INTO thumbnails(id, jpeg) VALUES (?, ?)",
                [(i, bytes(t)) for i, t in zip(ids, thumbnails, strict=True) if t],
            )
        return ids

    def _log_change(self, op: str, ids: Sequence[int]) -> None:
        self._conn.execute("INSERT INTO changes(op, ids) VALUES (?, ?)", (op, db.ids_blob(ids)))

    def _reset_if_pending(self) -> None:
        """First commit after :meth:`create`: make the schema, or replace the old gallery."""
        conn = self._db()
        if self._pending_init and not _has_schema(conn):
            db.init_schema(conn, self._meta_for_reset)
            self._pending_reset = False
        elif self._pending_init or self._pending_reset:
            self._pending_reset = True
            for table in ("tracklets", "vectors", "thumbnails"):
                conn.execute(f"DELETE FROM {table}")
            db.write_meta(conn, self._meta_for_reset)
            self._log_change("reset", [])
            self._reset_seq = db.last_seq(conn)

    def remove(self, tracklet_ids: Sequence[str]) -> int:
        """Remove tracklets, committed before returning; returns how many were removed.

        All or nothing: if any id is not in the gallery, nothing is removed.

        Raises:
            KeyError: naming the ids that are not in the index.
            GalleryBusyError, GalleryWriteError: as for :meth:`add`; nothing changed then.
        """
        wanted = list(dict.fromkeys(tracklet_ids))
        if not wanted:
            return 0
        with self._mutex:
            with self._writing("remove tracklets"):
                ids = self._delete(wanted)
            self._after_commit(("remove", ids, [], None))
        return len(ids)

    def _delete(self, wanted: list[str]) -> list[int]:
        """Delete the rows of ``wanted`` inside the open transaction; KeyError if any is absent."""
        found: dict[str, int] = {}
        for part in db.chunks(wanted):
            marks = ",".join("?" * len(part))
            found.update(
                self._conn.execute(
                    f"SELECT tracklet_id, id FROM tracklets WHERE tracklet_id IN ({marks})",
                    list(part),
                ).fetchall()
            )
        missing = [t for t in wanted if t not in found]
        if missing:
            raise KeyError(
                f"not in the index: {', '.join(map(str, missing[:20]))}"
                + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
            )
        ids = sorted(found.values())
        for table in ("tracklets", "vectors", "thumbnails"):
            for part in db.chunks(ids):
                marks = ",".join("?" * len(part))
                self._conn.execute(f"DELETE FROM {table} WHERE id IN ({marks})", list(part))
        self._log_change("remove", ids)
        return ids

    def _after_commit(self, own: tuple[str, list[int], list[GalleryItem], Any]) -> None:
        """Bring memory up to the database after this process's own commit (mutex held).

        When no other process committed in between, the change is applied from what is already
        in memory; otherwise the change log is replayed (which covers this change too).
        """
        seq = db.last_seq(self._db())
        op, ids, items, vectors = own
        try:
            if self._pending_init or self._pending_reset:
                self._start_fresh()
            if seq == self._mem.seq + 1:
                added = list(zip(ids, items, strict=True)) if op == "add" else []
                removed = np.asarray(ids if op == "remove" else [], dtype=np.int64)
                vecs = vectors if op == "add" else np.zeros((0, self.dim), np.float32)
                with self._lock.write():
                    self._mem.apply(removed, added, vecs)
                    self._mem.seq = seq
            else:
                self._catch_up()
        except Exception:
            # Committed, but memory could not follow: rebuild it from disk so both agree again.
            log.exception("%s: applying a committed change failed; reloading", self.path)
            self._reload()

    def _start_fresh(self) -> None:
        """After the first commit of a created gallery: memory restarts empty at the reset."""
        vindex = VectorIndex(self.index_type, self.dim, IndexParams(nprobe=self._nprobe))
        self._place(vindex)
        memory = _Memory(vindex, seq=self._reset_seq or 0)
        self._hook(memory)
        with self._lock.write():
            self._mem = memory
        self._pending_init = self._pending_reset = False
        self._reset_seq = None
        if (self.path / LEGACY_MANIFEST).exists():
            from vvireid.indexer.legacy import remove_legacy_files

            remove_legacy_files(self.path)

    def refresh(self) -> int:
        """Apply changes other processes committed; returns how many changes were applied.

        Cheap when nothing changed: one ``PRAGMA data_version`` on a connection of its own.
        """
        with self._mutex:
            if self._conn is None or self._closed:
                return 0
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version:
                return 0
            self._data_version = version
            before = self._mem.seq
            self._catch_up()
            return self._mem.seq - before

    def _catch_up(self) -> None:
        """Replay the change log after ``self._mem.seq`` into memory (mutex held)."""
        conn = self._db()
        rows: list[tuple[int, GalleryItem]] = []
        found: dict[int, np.ndarray] = {}
        removed: set[int] = set()
        with db.read_transaction(conn, self.db_file):
            last, changes = db.changes_since(conn, self._mem.seq)
            if not changes:
                return
            # A reset, or a log pruned past what memory knows: replaying is impossible.
            reset = any(op == "reset" for op, _ in changes) or (
                self._mem.seq < db.pruned_through(conn)
            )
            if not reset:
                added_ids, removed = _net_changes(changes)
                rows = [_item_from_row(r) for r in db.fetch_item_rows(conn, added_ids)]
                found = db.fetch_vectors(conn, [r[0] for r in rows], self.dim)
        if reset:
            self._reload()
            return
        rows = [r for r in rows if r[0] in found]
        vectors = (
            np.stack([found[r[0]] for r in rows]) if rows else np.zeros((0, self.dim), np.float32)
        )
        if rows and not self._mem.vindex.is_trained and len(rows) < min_train_size(self.index_type):
            self._reload()  # another process added to an untrained IVF gallery: rebuild and train
            return
        with self._lock.write():
            self._mem.apply(np.asarray(sorted(removed), dtype=np.int64), rows, vectors)
            self._mem.seq = last
        log.info("%s: applied %d committed change(s), now at change %d", self.path, len(changes), last)

    def _reload(self) -> None:
        """Replace memory with a fresh load from the database (mutex held)."""
        memory = self._load_memory(verify=True)
        self._place(memory.vindex)
        with self._lock.write():
            self._mem = memory

    def retrain(self) -> dict[str, Any]:
        """Train a new IVF index on the stored vectors and swap it in; searches go on meanwhile.

        Training runs on one consistent view of the database, outside every lock; the changes
        committed during training are replayed before the swap. Also rebuilds a flat index.
        """
        started = time.perf_counter()
        memory = self._load_memory(retrain=True)
        with self._mutex:
            previous, self._mem = self._mem, memory  # catch-up works on self._mem
            try:
                self._catch_up()
            except BaseException:
                self._mem = previous
                raise
            fresh, self._mem = self._mem, previous
            self._place(fresh.vindex)
            with self._lock.write():
                self._mem = fresh
        self.save()
        return {
            "index": str(self.path),
            "index_type": self.index_type,
            "count": len(self),
            "index_params": self._mem.vindex.params.to_dict(),
            "seconds": round(time.perf_counter() - started, 3),
        }

    # ---- snapshots and background work --------------------------------------------------

    def save(self) -> None:
        """Write the FAISS snapshot now (changes themselves are already committed by add/remove).

        Kept under its old name so callers that "add, then save" stay correct; with a pending
        overwrite (see :meth:`create`) it commits the (empty) replacement first.

        Raises:
            OSError: the snapshot could not be written; the gallery itself is unaffected.
        """
        if self._pending_reset or self._pending_init:
            with self._mutex:
                with self._writing("create the gallery"):
                    self._reset_if_pending()
                self._after_commit(("reset", [], [], None))
        self._write_snapshot()

    def _write_snapshot(self) -> None:
        """Serialise the index and write it (see :func:`write_snapshot` for the format).

        Serialising holds the writers' mutex, not the readers-writer lock: memory cannot change
        meanwhile (every change is applied under the mutex), FAISS serialisation only reads, so
        searches go on; a write arriving meanwhile waits. The disk write holds nothing.
        """
        with self._mutex:
            memory = self._mem
            seq = memory.seq
            if seq == self._snapshot_seq and (self.path / SNAPSHOT).exists():
                return
            buffer = _HashingBuffer()
            memory.vindex.write_to(buffer)
            count, params = memory.vindex.ntotal, memory.vindex.params
        write_snapshot(self.path, buffer, seq=seq, count=count, params=params, owner=self)
        self._snapshot_seq = seq
        self._prune_changes(seq - CHANGES_KEPT)

    def _prune_changes(self, through: int) -> None:
        """Delete change-log rows up to ``through`` (covered by the snapshot), best effort."""
        if through <= 0 or self._pending_init:
            return
        try:
            with self._mutex, db.write_transaction(self._db(), self.db_file, "prune the log"):
                conn = self._db()
                if db.pruned_through(conn) >= through:
                    return
                conn.execute("DELETE FROM changes WHERE seq <= ?", (through,))
                db.write_meta(conn, {"pruned_through": through})
        except (GalleryWriteError, IndexConflictError) as exc:
            log.warning("%s: could not prune the change log (%s)", self.path, exc)

    def snapshot_if_due(self, every: int = 1000, fraction: float = 0.1) -> bool:
        """Write a snapshot when the changes it would cover number at least ``every`` and
        ``fraction`` of the gallery (see :meth:`start_background`); returns whether it did.

        Short-lived writers (``vvireid-index add/remove``) call this instead of :meth:`save`, so a
        one-tracklet change does not rewrite the whole index: the next open replays it instead.
        """
        if self._pending_reset or self._pending_init:
            self.save()
            return True
        behind = self._mem.seq - max(self._snapshot_seq, 0)
        if behind < max(every, fraction * len(self)):
            return False
        self._write_snapshot()
        return True

    def start_background(
        self, *, poll_s: float = 0.5, snapshot_every: int = 1000, snapshot_fraction: float = 0.1
    ) -> None:
        """Start the daemon thread that applies other processes' commits and writes snapshots.

        A snapshot is written once the changes it would cover number at least ``snapshot_every``
        and ``snapshot_fraction`` of the gallery: replay at open stays a fraction of a rebuild,
        and a snapshot (the whole index) costs at most 1 / ``snapshot_fraction`` vectors of
        writing per change, whatever the gallery size.
        """
        if self._worker is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(poll_s):
                try:
                    self.refresh()
                    self.snapshot_if_due(snapshot_every, snapshot_fraction)
                except Exception:  # noqa: BLE001 - a background task must keep running
                    log.exception("%s: background refresh/snapshot failed", self.path)

        self._worker = threading.Thread(target=loop, name="gallery-background", daemon=True)
        self._worker.start()

    def close(self) -> None:
        """Stop the background thread and close the database connections."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout=30)
            self._worker = None
        with self._mutex:
            self._closed = True
            with self._read_lock:
                if self._read_conn is not None:
                    self._read_conn.close()
                    self._read_conn = None
            if self._conn is not None:
                # Fold the WAL into the database file, so a reader that cannot write the folder
                # (a server as another user, a read-only mount: opened immutable) sees every commit.
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._conn.close()


class _HashingBuffer:
    """A write-only file object that keeps FAISS's output in blocks and hashes it on the way."""

    def __init__(self) -> None:
        self.blocks: list[bytes] = []
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        block = bytes(data)
        self.blocks.append(block)
        self.digest.update(block)
        self.size += len(block)
        return len(block)


def write_snapshot(
    folder: Path,
    payload: VectorIndex | _HashingBuffer,
    *,
    seq: int,
    count: int,
    params: IndexParams,
    owner: GalleryIndex | Any,
) -> None:
    """Write ``folder/snapshot.faiss`` atomically, tagged with the change ``seq`` it covers.

    File format: ``_SNAPSHOT_MAGIC`` + a JSON header padded to ``_SNAPSHOT_HEADER`` bytes (seq,
    count, dim, type, model, sha256 and size of the payload), then the FAISS bytes. Written to a
    temp file and renamed, so the previous snapshot stays until the new one is complete.
    ``owner`` supplies ``dim``, ``index_type`` and ``fingerprint``.
    """
    if isinstance(payload, VectorIndex):
        buffer = _HashingBuffer()
        payload.write_to(buffer)
    else:
        buffer = payload
    header = {
        "format": "vvireid.snapshot",
        "seq": int(seq),
        "count": int(count),
        "dim": int(owner.dim),
        "index_type": owner.index_type,
        "index_params": params.to_dict(),
        "model_fingerprint": owner.fingerprint,
        "bytes": buffer.size,
        "sha256": buffer.digest.hexdigest(),
    }

    def fill(handle: BinaryIO) -> None:
        handle.write(_encode_header(header))
        for block in buffer.blocks:
            handle.write(block)

    files.write_stream_atomic(folder / SNAPSHOT, fill)
    log.info("wrote snapshot %s (change %d, %d vectors)", folder / SNAPSHOT, seq, count)


def _encode_header(header: dict[str, Any]) -> bytes:
    raw = _SNAPSHOT_MAGIC + json.dumps(header).encode()
    if len(raw) > _SNAPSHOT_HEADER:
        raise ValueError("snapshot header too large")
    return raw + b" " * (_SNAPSHOT_HEADER - len(raw))


def _read_snapshot(
    file: Path, index: GalleryIndex, verify: bool
) -> tuple[dict[str, Any], VectorIndex]:
    """Parse and check a snapshot file; raises ValueError naming what is wrong."""
    with open(file, "rb") as handle:
        head = handle.read(_SNAPSHOT_HEADER)
        if not head.startswith(_SNAPSHOT_MAGIC) or len(head) < _SNAPSHOT_HEADER:
            raise ValueError("not a vvireid snapshot file")
        try:
            header = json.loads(head[len(_SNAPSHOT_MAGIC) :].decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"unreadable header ({exc})") from None
        expect = {
            "dim": index.dim,
            "index_type": index.index_type,
            "model_fingerprint": index.fingerprint,
        }
        for key, value in expect.items():
            if header.get(key) != value:
                raise ValueError(f"{key} is {header.get(key)!r}, the gallery has {value!r}")
        size = file.stat().st_size - _SNAPSHOT_HEADER
        if size != header.get("bytes"):
            raise ValueError(f"{size} payload bytes, header says {header.get('bytes')}")
        if verify:
            digest = hashlib.sha256()
            while block := handle.read(1 << 22):
                digest.update(block)
            if digest.hexdigest() != header.get("sha256"):
                raise ValueError("checksum mismatch (the file is corrupted)")
            handle.seek(_SNAPSHOT_HEADER)
        params = IndexParams.from_dict(header.get("index_params") or {})
        vindex = VectorIndex.read_from(index.index_type, index.dim, params, handle)
    if vindex.ntotal != header.get("count"):
        raise ValueError(f"holds {vindex.ntotal} vectors, header says {header.get('count')}")
    return header, vindex


def _net_changes(changes: list[tuple[str, np.ndarray]]) -> tuple[list[int], set[int]]:
    """(ids added and still present, ids removed) over a run of changes (ids are never reused)."""
    added: dict[int, None] = {}
    removed: set[int] = set()
    for op, ids in changes:
        if op == "add":
            added.update(dict.fromkeys(ids.tolist()))
        elif op == "remove":
            for internal in ids.tolist():
                if internal in added:
                    del added[internal]
                else:
                    removed.add(internal)
    return list(added), removed


def _add_stored(
    conn: sqlite3.Connection, file: Path, vindex: VectorIndex, ids: list[int], dim: int
) -> None:
    """Add the stored vectors of ``ids`` to ``vindex``, reading them in batches."""
    for start in range(0, len(ids), _READ_CHUNK):
        part = ids[start : start + _READ_CHUNK]
        found = db.fetch_vectors(conn, part, dim)
        missing = [i for i in part if i not in found]
        if missing:
            raise IndexFormatError(f"{file}: tracklets {missing[:5]} have no stored vector")
        vindex.add(np.asarray(part, dtype=np.int64), np.stack([found[i] for i in part]))


def _has_schema(source: sqlite3.Connection | Path) -> bool:
    """Whether a database (connection or existing file) holds the gallery tables."""
    sql = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
    if isinstance(source, sqlite3.Connection):
        return source.execute(sql).fetchone() is not None
    conn = db.connect(source, readonly=True)
    try:
        return conn.execute(sql).fetchone() is not None
    except sqlite3.Error:
        return True  # something is there: do not treat it as free space
    finally:
        conn.close()
