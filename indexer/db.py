"""The gallery's source of truth: one SQLite database (standard library ``sqlite3``, WAL mode).

Tables::

    meta        key -> value: format, format_version, dim, similarity, index_type, nprobe,
                model_fingerprint, model_config (JSON), created, updated
    tracklets   id (internal, AUTOINCREMENT so never reused), tracklet_id UNIQUE, modality,
                camid, camera, pid, timestamp, frames (JSON list)
    vectors     id -> float32 BLOB of ``dim`` values (kept apart so a metadata scan stays small)
    thumbnails  id -> JPEG BLOB
    changes     seq (AUTOINCREMENT), op ('add' | 'remove' | 'reset'), ids (int64 BLOB):
                one row per committed write, so another process (or a snapshot) can replay
                exactly what happened after the point it knows; rows older than the snapshot
                by more than ``CHANGES_KEPT`` are pruned (``meta.pruned_through``), and a reader
                that fell behind that point reloads instead of replaying

Why SQLite: a write is one transaction that costs O(change), a kill at any moment leaves the last
commit, and several processes share the file with SQLite's own locking (one writer at a time,
readers never blocked in WAL mode). ``synchronous=FULL`` (the default here) makes every
acknowledged commit survive a power loss as well as a process crash; ``NORMAL`` survives only the
crash, saving one fsync per commit.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DB_NAME = "gallery.sqlite3"
FORMAT = "vvireid.gallery"
FORMAT_VERSION = 2
BUSY_TIMEOUT_S = 10.0
SYNCHRONOUS = ("FULL", "NORMAL")
_CHUNK = 500  # ids per IN (...) list, below SQLite's variable limit

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tracklets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tracklet_id TEXT NOT NULL UNIQUE,
    modality INTEGER NOT NULL,
    camid INTEGER NOT NULL,
    camera TEXT,
    pid INTEGER,
    timestamp REAL,
    frames TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS vectors (id INTEGER PRIMARY KEY, vector BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS thumbnails (id INTEGER PRIMARY KEY, jpeg BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL CHECK (op IN ('add', 'remove', 'reset')),
    ids BLOB NOT NULL
);
"""


class IndexFormatError(ValueError):
    """A gallery folder cannot be used (missing, corrupt or foreign file); names the file."""


class IndexMismatchError(ValueError):
    """The gallery was built by another model (fingerprint or dimension differ)."""


def check_model(
    where: str | Path, meta: dict[str, Any], fingerprint: str | None, dim: int | None
) -> None:
    """Refuse a gallery built by another model (any backend): features are not comparable.

    Raises:
        IndexMismatchError: naming the gallery, both fingerprints (or dimensions) and the fix.
    """
    if fingerprint is not None and meta["model_fingerprint"] != fingerprint:
        method = (meta.get("model_config") or {}).get("method", "?")
        raise IndexMismatchError(
            f"{where}: built with model {meta['model_fingerprint']} ({method}), but the "
            f"checkpoint given has fingerprint {fingerprint}; features of different models are "
            f"not comparable - rebuild the gallery with this checkpoint or use the one it was "
            f"built with"
        )
    if dim is not None and int(meta["dim"]) != int(dim):
        raise IndexMismatchError(f"{where}: holds {meta['dim']}-d vectors, the model produces {dim}-d")


class IndexConflictError(RuntimeError):
    """A write could not be applied because of another writer; retrying may succeed."""


class GalleryBusyError(IndexConflictError):
    """Another process held the database's write lock for longer than the busy timeout."""


class GalleryWriteError(OSError):
    """The disk refused a write (full, read-only, I/O error); committed data is unchanged."""


def connect(file: Path, *, synchronous: str = "FULL", readonly: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, with a busy timeout.

    ``check_same_thread`` is off because the store serialises use of each connection itself.
    """
    if synchronous not in SYNCHRONOUS:
        raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}, got {synchronous!r}")
    if not readonly and file.exists() and not os.access(file.parent, os.W_OK):
        # A read-only folder (e.g. a read-only mount for query-only servers): WAL cannot create
        # its -shm file there, so open the database frozen; every write then fails clearly.
        log.warning(
            "%s: the folder is read-only; the gallery is opened read-only and frozen (writes "
            "fail, changes made through another mount are not seen)", file
        )
        wal_file = file.with_name(file.name + "-wal")
        if wal_file.exists() and wal_file.stat().st_size > 0:
            # Opened immutable, SQLite would ignore these commits and serve an older gallery.
            raise IndexFormatError(
                f"{file}: the folder is read-only and recent commits are still in {wal_file.name}; "
                "open the gallery once as a user who can write the folder (for example "
                "`vvireid-index info DIR`) to fold them into the database, then retry"
            )
        return _open(f"file:{file}?mode=ro&immutable=1", file, synchronous, wal=False)
    if not readonly:
        # SQLite creates a database 0644 whatever the umask, and its -wal/-shm files copy the
        # database's mode: create the file first so all three honour the umask (0o666 & ~umask).
        with contextlib.suppress(FileExistsError):
            os.close(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    target = f"file:{file}?mode=ro" if readonly else f"file:{file}?mode=rwc"
    return _open(target, file, synchronous, wal=not readonly)


def _open(target: str, file: Path, synchronous: str, *, wal: bool) -> sqlite3.Connection:
    conn = None
    try:
        conn = sqlite3.connect(
            target, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        if wal:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("%s: journal mode is %s, not WAL (unsupported file system?)", file, mode)
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA foreign_keys=OFF")
    except sqlite3.DatabaseError as exc:
        if conn is not None:
            conn.close()
        raise translate(exc, file, "open") from None
    return conn


def translate(exc: BaseException, file: Path, doing: str) -> Exception:
    """Turn a ``sqlite3`` error into one of this module's errors, naming the file and the fix."""
    text = str(exc)
    lowered = text.lower()
    if "locked" in lowered or "busy" in lowered:
        return GalleryBusyError(
            f"{file}: the gallery database is busy (another process is writing and held the "
            f"lock for more than {BUSY_TIMEOUT_S:.0f} s) while trying to {doing}; retry"
        )
    if "full" in lowered:
        return GalleryWriteError(
            errno.ENOSPC, f"{file}: disk full while trying to {doing}; nothing was changed, "
            "committed data is intact (free space and retry)"
        )
    if "readonly" in lowered or "read-only" in lowered:
        return GalleryWriteError(
            errno.EROFS, f"{file}: the gallery is read-only for this process ({text}) while "
            f"trying to {doing}; nothing was changed"
        )
    if "unable to open" in lowered:
        return GalleryWriteError(errno.EACCES, f"{file}: cannot open the gallery database ({text})")
    if "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered:
        return IndexFormatError(f"{file}: not a readable gallery database ({text})")
    if isinstance(exc, sqlite3.OperationalError) and "disk i/o" in lowered:
        return GalleryWriteError(errno.EIO, f"{file}: disk I/O error while trying to {doing}")
    return IndexFormatError(f"{file}: database error while trying to {doing} ({text})")


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection, file: Path, doing: str) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back on any error, sqlite errors translated.

    IMMEDIATE takes the write lock up front, so a busy database fails before any work is done.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise translate(exc, file, doing) from None
    try:
        yield
        conn.execute("COMMIT")
    except BaseException as exc:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.IntegrityError):
            raise
        if isinstance(exc, sqlite3.Error):
            raise translate(exc, file, doing) from None
        raise


@contextlib.contextmanager
def read_transaction(conn: sqlite3.Connection, file: Path) -> Iterator[None]:
    """One consistent view of the database for several SELECTs (WAL: writers go on meanwhile)."""
    try:
        conn.execute("BEGIN")
        yield
    except sqlite3.Error as exc:
        raise translate(exc, file, "read the gallery") from None
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("COMMIT")


def init_schema(conn: sqlite3.Connection, meta: dict[str, Any]) -> None:
    """Create the tables and write ``meta`` (called inside a write transaction)."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    write_meta(conn, meta)


def write_meta(conn: sqlite3.Connection, meta: dict[str, Any]) -> None:
    conn.executemany(
        "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
        [(k, json.dumps(v)) for k, v in meta.items()],
    )


def read_meta(conn: sqlite3.Connection, file: Path) -> dict[str, Any]:
    """The ``meta`` table as a dict, checked to be a vvireid gallery of a known version."""
    try:
        rows = conn.execute("SELECT key, value FROM meta").fetchall()
    except sqlite3.Error as exc:
        raise translate(exc, file, "read the gallery header") from None
    meta = {}
    for key, value in rows:
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            raise IndexFormatError(f"{file}: meta.{key}: not valid JSON ({value[:60]!r})") from None
    if meta.get("format") != FORMAT:
        raise IndexFormatError(f"{file}: not a vvireid gallery database (meta.format missing)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(
            f"{file}: gallery format version {meta.get('format_version')} is not supported "
            f"(this vvireid reads version {FORMAT_VERSION})"
        )
    missing = [k for k in ("dim", "similarity", "index_type", "model_fingerprint") if k not in meta]
    if missing:
        raise IndexFormatError(f"{file}: meta: missing field(s) {', '.join(missing)}")
    return meta


def chunks(values: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def ids_blob(ids: Iterable[int]) -> bytes:
    return np.asarray(list(ids), dtype="<i8").tobytes()


def blob_ids(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<i8").astype(np.int64)


def vector_blob(row: np.ndarray) -> bytes:
    return np.asarray(row, dtype="<f4").tobytes()


def last_seq(conn: sqlite3.Connection) -> int:
    """The newest change's seq (from AUTOINCREMENT's counter: right even after pruning)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
    if row is None:
        row = conn.execute("SELECT max(seq) FROM changes").fetchone()
    return int(row[0] or 0)


def pruned_through(conn: sqlite3.Connection) -> int:
    """Changes up to this seq have been deleted from the log (0: none)."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'pruned_through'").fetchone()
    return int(json.loads(row[0])) if row else 0


def changes_since(conn: sqlite3.Connection, seq: int) -> tuple[int, list[tuple[str, np.ndarray]]]:
    """(last seq, [(op, ids)...]) of the changes committed after ``seq``, oldest first."""
    rows = conn.execute("SELECT seq, op, ids FROM changes WHERE seq > ? ORDER BY seq", (seq,))
    out, last = [], seq
    for number, op, blob in rows:
        out.append((str(op), blob_ids(blob)))
        last = int(number)
    return last, out


def fetch_vectors(conn: sqlite3.Connection, ids: Sequence[int], dim: int) -> dict[int, np.ndarray]:
    """Stored vectors of ``ids`` (absent ids are simply missing from the result)."""
    found: dict[int, np.ndarray] = {}
    for part in chunks(list(ids)):
        marks = ",".join("?" * len(part))
        for internal, blob in conn.execute(
            f"SELECT id, vector FROM vectors WHERE id IN ({marks})", list(part)
        ):
            found[int(internal)] = np.frombuffer(blob, dtype="<f4", count=dim)
    return found


ITEM_COLUMNS = "id, tracklet_id, modality, camid, camera, pid, timestamp, frames"


def fetch_item_rows(conn: sqlite3.Connection, ids: Sequence[int] | None = None) -> list[tuple]:
    """Metadata rows (all, or those of ``ids``) ordered by internal id."""
    if ids is None:
        return conn.execute(f"SELECT {ITEM_COLUMNS} FROM tracklets ORDER BY id").fetchall()
    rows: list[tuple] = []
    for part in chunks(list(ids)):
        marks = ",".join("?" * len(part))
        rows += conn.execute(
            f"SELECT {ITEM_COLUMNS} FROM tracklets WHERE id IN ({marks})", list(part)
        ).fetchall()
    rows.sort(key=lambda r: r[0])
    return rows
