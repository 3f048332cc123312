"""Crash-safe file primitives: the one home of atomic writes for every layer.

Why a module of its own: every file the project writes (checkpoints, manifests, run files,
reports, plots, the index) goes through these few functions, so the
atomicity argument ("a kill at any moment leaves the previous index loadable") is checked in one
place. A file is written under a temporary name in its final folder, flushed and fsynced, renamed
with ``os.replace`` (atomic on POSIX), and the folder is fsynced so the rename itself is durable.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

_CHUNK = 1 << 22


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's content, read in 4 MiB chunks (files can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(folder: str | Path) -> None:
    """Make renames and unlinks inside ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[Path], None], *, sync_dir: bool = True) -> None:
    """Produce ``path`` atomically: ``write(tmp)`` fills a temp file, then fsync, rename, dir fsync.

    Readers see either the old file (or none) or the complete new one, never a partial file.
    ``sync_dir=False`` leaves the folder fsync to the caller (for a commit point, whose rename has
    already happened when that fsync could fail).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # os.open with 0o666 honours the umask (mkstemp would make the file owner-only, and a server
    # running as another user could not read the index).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    umask_mode = os.fstat(fd).st_mode & 0o777
    os.close(fd)
    try:
        write(tmp)
        # Some writers replace the file with one of their own (safetensors' save_file makes it
        # 0600): put back the umask's mode, read from the file created above (os.umask() would
        # have to change the process-wide umask to read it).
        if os.stat(tmp).st_mode & 0o777 != umask_mode:
            os.chmod(tmp, umask_mode)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes, *, sync_dir: bool = True) -> None:
    """``write_atomic`` for an in-memory payload."""

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    write_atomic(path, fill, sync_dir=sync_dir)


def write_text_atomic(path: str | Path, text: str) -> None:
    """``write_atomic`` for a UTF-8 text payload."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_stream_atomic(path: str | Path, fill: Callable[[BinaryIO], None]) -> None:
    """``write_atomic`` for payloads produced piece by piece into an open binary file."""

    def run(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            fill(handle)

    write_atomic(path, run)


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[None]:
    """An exclusive advisory lock on ``folder/.lock`` so two writers never interleave.

    Readers never take it: they rely on the manifest being swapped atomically.
    """
    import fcntl

    lock_path = Path(folder) / ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def remove_quietly(path: str | Path) -> None:
    """Best-effort delete used after a commit: failing to tidy up must not fail the commit."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not delete %s (%s); it is unused and can be removed by hand", path, exc)
