"""One-time conversion of format-1 index folders (``vvireid.index`` version 1) to the database.

Format 1 kept a ``manifest.json`` naming checksummed generation files: ``index.<gen>.faiss``,
``items.<gen>.jsonl``, ``vectors.<gen>.npy`` (ivfpq only) and ``thumbs.<gen>.bin`` segments.

Why the conversion is safe to interrupt: the database is written under a temporary name, fsynced
and renamed to ``gallery.sqlite3`` (the commit point); only then are the old files deleted, the
manifest last. A kill before the rename leaves the old folder as it was (the temp file is
removed by the next attempt); a kill after it leaves a working gallery plus old files that the
next conversion attempt never looks at and :func:`remove_legacy_files` deletes.

It runs automatically at the first :meth:`GalleryIndex.open` (or explicitly with
``vvireid-index migrate``); the old FAISS index becomes the first snapshot, so IVF training is
kept as it was.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from vvireid.indexer import db
from vvireid.indexer.backend import INDEX_TYPES, IndexParams, VectorIndex
from vvireid.indexer.db import DB_NAME, GalleryWriteError, IndexFormatError
from vvireid.model import fileio as files
from vvireid.model.types import Modality

log = logging.getLogger(__name__)

LEGACY_FORMAT = "vvireid.index"
LEGACY_VERSION = 1
MANIFEST = "manifest.json"
_DATA_FILE = re.compile(r"^(index|items|vectors|thumbs)\.\d{6}\.(faiss|jsonl|npy|bin)$")
_REQUIRED = ("format", "format_version", "dim", "similarity", "index_type", "model_fingerprint")


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and check a format-1 ``manifest.json``; errors name the file and field."""
    file = path / MANIFEST
    try:
        header = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFormatError(f"{file}: missing; {path} is not a vvireid index") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFormatError(f"{file}: not a readable index manifest ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != LEGACY_FORMAT:
        raise IndexFormatError(f"{file}: not a vvireid index manifest")
    missing = [key for key in (*_REQUIRED, "files") if key not in header]
    if missing:
        raise IndexFormatError(f"{file}: missing field(s) {', '.join(missing)}")
    if header["format_version"] != LEGACY_VERSION or header["index_type"] not in INDEX_TYPES:
        raise IndexFormatError(
            f"{file}: format_version {header['format_version']} / index_type "
            f"{header['index_type']!r} cannot be converted"
        )
    listed = header["files"]
    for entry in _entries(listed):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or "/" in name or name.startswith(".") or "sha256" not in entry:
            raise IndexFormatError(f"{file}: files: malformed entry {entry!r}")
    return header


def _entries(listed: dict[str, Any]) -> list[dict[str, Any]]:
    if not isinstance(listed, dict) or "index" not in listed or "items" not in listed:
        raise IndexFormatError(f"{MANIFEST}: files: must list 'index' and 'items'")
    found = [listed["index"], listed["items"], *listed.get("thumbnails", [])]
    return found + ([listed["vectors"]] if "vectors" in listed else [])


def _verify(path: Path, entry: dict[str, Any]) -> Path:
    file = path / entry["name"]
    if not file.is_file():
        raise IndexFormatError(f"{file}: data file listed in {path / MANIFEST} is missing")
    if files.sha256_file(file) != entry["sha256"]:
        raise IndexFormatError(
            f"{file}: checksum mismatch with {MANIFEST}: the file is corrupted or was changed; "
            "rebuild the index"
        )
    return file


def _read_items(file: Path) -> list[dict[str, Any]]:
    records = []
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
                record["id"] = int(record["id"])
                record["modality"] = int(Modality.parse(record["modality"]))
                record["camid"] = int(record["camid"])
                str(record["tracklet_id"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise IndexFormatError(f"{file}:{number}: malformed item record ({exc})") from None
            records.append(record)
    return records


def migrate(path: str | Path) -> dict[str, Any]:
    """Convert the format-1 folder ``path`` in place; returns a summary. See the module docstring.

    Raises:
        IndexFormatError: a missing or corrupt format-1 file (named); nothing is changed then.
        GalleryWriteError: the folder is not writable or the disk is full; nothing is changed.
    """
    path = Path(path)
    if (path / DB_NAME).exists():
        remove_legacy_files(path)
        return {"index": str(path), "converted": 0, "note": "already converted"}
    header = read_manifest(path)
    if not os.access(path, os.W_OK):
        raise GalleryWriteError(
            errno.EROFS, f"{path}: a format-1 index in a read-only folder; convert it once "
            f"with write access (`vvireid-index migrate {path}`), then it opens read-only too"
        )
    listed = header["files"]
    for entry in _entries(listed):
        _verify(path, entry)
    records = _read_items(path / listed["items"]["name"])
    dim = int(header["dim"])
    vindex = VectorIndex(
        header["index_type"], dim, IndexParams.from_dict(header.get("index_params") or {}),
        faiss.read_index(str(path / listed["index"]["name"])),
    )
    ids = np.asarray([r["id"] for r in records], dtype=np.int64)
    if vindex.ntotal != len(ids):
        raise IndexFormatError(
            f"{path / listed['index']['name']}: {vindex.ntotal} vectors, items list {len(ids)}"
        )
    if "vectors" in listed:
        vectors = np.load(path / listed["vectors"]["name"], allow_pickle=False)
    else:
        vectors = vindex.reconstruct(ids) if len(ids) else np.zeros((0, dim), np.float32)
    tmp = path / f".{DB_NAME}.converting"
    tmp.unlink(missing_ok=True)
    try:
        _write_database(tmp, header, records, np.asarray(vectors, np.float32), path)
        os.replace(tmp, path / DB_NAME)  # the commit point (the file is fsynced by SQLite)
        files.fsync_dir(path)
    finally:
        tmp.unlink(missing_ok=True)
    log.warning(
        "%s: converted the format-1 index (%d tracklets) to %s; old files removed",
        path, len(records), DB_NAME,
    )
    _write_first_snapshot(path, header, vindex)
    remove_legacy_files(path)
    return {"index": str(path), "converted": len(records), "database": str(path / DB_NAME)}


def _write_database(
    file: Path, header: dict[str, Any], records: list[dict[str, Any]], vectors: np.ndarray,
    folder: Path,
) -> None:
    """The whole database in one transaction at ``file`` (rollback journal: a single file)."""
    try:
        conn = sqlite3.connect(file, isolation_level=None)
    except sqlite3.Error as exc:
        raise db.translate(exc, file, "convert the index") from None
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("BEGIN IMMEDIATE")
        db.init_schema(conn, _meta(header))
        conn.executemany(
            f"INSERT INTO tracklets({db.ITEM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r["id"], str(r["tracklet_id"]), r["modality"], r["camid"], r.get("camera"),
                    r.get("pid"), r.get("timestamp"), json.dumps(list(r.get("frames") or [])),
                )
                for r in records
            ],
        )
        conn.executemany(
            "INSERT INTO vectors(id, vector) VALUES (?, ?)",
            [(r["id"], db.vector_blob(v)) for r, v in zip(records, vectors, strict=True)],
        )
        _copy_thumbnails(conn, folder, records)
        next_id = int(header.get("next_id") or 0)
        conn.execute("DELETE FROM sqlite_sequence WHERE name = 'tracklets'")
        high = max([next_id - 1, *(r["id"] for r in records)], default=0)
        conn.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('tracklets', ?)", (high,))
        ids = [r["id"] for r in records]
        conn.execute("INSERT INTO changes(op, ids) VALUES ('add', ?)", (db.ids_blob(ids),))
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise db.translate(exc, file, "convert the index") from None
    finally:
        conn.close()


def _meta(header: dict[str, Any]) -> dict[str, Any]:
    params = header.get("index_params") or {}
    return {
        "format": db.FORMAT,
        "format_version": db.FORMAT_VERSION,
        "dim": int(header["dim"]),
        "similarity": header["similarity"],
        "index_type": header["index_type"],
        "nprobe": int(params.get("nprobe") or 0),
        "model_fingerprint": header["model_fingerprint"],
        "model_config": header.get("model_config") or {},
        "created": header.get("created"),
        "updated": header.get("updated"),
        "converted_from": f"{LEGACY_FORMAT} {LEGACY_VERSION}",
    }


def _copy_thumbnails(conn: sqlite3.Connection, folder: Path, records: list[dict[str, Any]]) -> None:
    handles: dict[str, Any] = {}
    try:
        for record in records:
            where = record.get("thumb")
            if not where:
                continue
            name, offset, length = str(where[0]), int(where[1]), int(where[2])
            if name not in handles:
                handles[name] = open(folder / name, "rb")  # noqa: SIM115 - closed below
            handles[name].seek(offset)
            conn.execute(
                "INSERT INTO thumbnails(id, jpeg) VALUES (?, ?)",
                (record["id"], handles[name].read(length)),
            )
    finally:
        for handle in handles.values():
            handle.close()


def _write_first_snapshot(path: Path, header: dict[str, Any], vindex: VectorIndex) -> None:
    """Keep the old FAISS index as the snapshot of change 1 (best effort: else it is rebuilt)."""
    from types import SimpleNamespace

    from vvireid.indexer.store import write_snapshot

    owner = SimpleNamespace(
        dim=int(header["dim"]), index_type=header["index_type"],
        fingerprint=header["model_fingerprint"],
    )
    try:
        write_snapshot(
            path, vindex, seq=1, count=vindex.ntotal, params=vindex.params, owner=owner
        )
    except (OSError, RuntimeError) as exc:
        log.warning("%s: could not keep the old FAISS index as a snapshot (%s)", path, exc)


def remove_legacy_files(path: Path) -> None:
    """Delete format-1 data files (after the database committed), the manifest last."""
    for entry in path.iterdir():
        if _DATA_FILE.match(entry.name) and entry.is_file():
            files.remove_quietly(entry)
    files.remove_quietly(path / MANIFEST)
    files.fsync_dir(path)
