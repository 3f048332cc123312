"""The live gallery as a database: crashes, several processes, busy/full/read-only, format 1.

Every test uses the real SQLite, FAISS and processes (no mocks): the kill test SIGKILLs a real
writer process, the multi-process tests run a second Python process on the same folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from vvireid.indexer import db
from vvireid.indexer.store import (
    DB_NAME,
    GalleryBusyError,
    GalleryIndex,
    GalleryItem,
    GalleryWriteError,
)
from vvireid.model.types import Modality

DIM = 8


def item(i: int) -> GalleryItem:
    return GalleryItem(f"t{i}", Modality(i % 2), i % 3, camera=f"c{i % 3}", pid=i)


def vector(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(DIM).astype(np.float32)


def new_gallery(path: Path, **kw) -> GalleryIndex:
    return GalleryIndex.create(
        path, dim=DIM, model_fingerprint="fp", similarity="cosine", device="cpu", **kw
    )


def disk_state(path: Path) -> dict[str, tuple]:
    """tracklet_id -> (has vector, has thumbnail), read straight from the database file."""
    conn = sqlite3.connect(path / DB_NAME)
    try:
        rows = conn.execute(
            "SELECT t.tracklet_id, v.id IS NOT NULL, h.id IS NOT NULL FROM tracklets t "
            "LEFT JOIN vectors v ON v.id = t.id LEFT JOIN thumbnails h ON h.id = t.id"
        ).fetchall()
    finally:
        conn.close()
    return {r[0]: (bool(r[1]), bool(r[2])) for r in rows}


WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from vvireid.indexer.store import GalleryIndex, GalleryItem
    from vvireid.model.types import Modality

    path, start = sys.argv[1], int(sys.argv[2])
    index = GalleryIndex.open(path, device="cpu")
    live = [t for t in index.tracklet_ids()]
    i = start
    while True:
        if i % 3 == 2 and live:
            victim = live.pop(0)
            print("begin remove", victim, flush=True)
            index.remove([victim])
        else:
            vec = np.random.default_rng(i).standard_normal(8).astype(np.float32)
            print("begin add", f"t{i}", flush=True)
            index.add([GalleryItem(f"t{i}", Modality(i % 2), i % 3)], vec[None], [b"jpeg%d" % i])
            live.append(f"t{i}")
        print("done", flush=True)
        if i % 25 == 0:
            index.save()
        i += 1
    """
)


@pytest.mark.slow
def test_sigkill_during_writes_loses_nothing_acknowledged(tmp_path):
    """SIGKILL a writer process at random moments, 20 times; after each kill every acknowledged
    change is there, no add is half there, and FAISS holds exactly the database's tracklets."""
    path = tmp_path / "g"
    new_gallery(path).save()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = np.random.default_rng(0)
    expected: set[str] = set()
    start = 0
    for round_ in range(20):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path), str(start)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the writer is running: kill it somewhere after this
        time.sleep(float(rng.uniform(0.0, 0.4)))
        proc.send_signal(signal.SIGKILL)
        # Read through the same buffered file as readline() did: communicate() reads the raw pipe
        # and would drop lines that readline() had already buffered (an acknowledged op lost from
        # the log, not from the gallery).
        out = proc.stdout.read()
        err = proc.stderr.read() if proc.stderr else ""
        proc.wait()
        # A line cut by the kill (no newline yet) was never written: that op never began.
        in_flight = None
        for line in (first + out).split("\n")[:-1]:
            if line == "done":
                op, tracklet = in_flight
                (expected.add if op == "add" else expected.discard)(tracklet)
                in_flight = None
            else:
                in_flight = tuple(line.split()[1:])
        start += (first + out).count("begin") + 5  # fresh ids
        on_disk = disk_state(path)
        # Acknowledged changes are all there; the one in flight is either fully there or not.
        maybe = {in_flight[1]} if in_flight else set()
        assert expected - set(on_disk) <= maybe, (round_, expected - set(on_disk), err[-500:])
        assert set(on_disk) - expected <= maybe, (round_, set(on_disk) - expected)
        assert all(v and t for v, t in on_disk.values()), "an add is half-applied"
        index = GalleryIndex.open(path, device="cpu")
        assert set(index.tracklet_ids()) == set(on_disk)
        assert index._mem.vindex.ntotal == len(on_disk) == len(index)
        index.close()
        expected = set(on_disk)  # an unacknowledged add that committed is now simply there


def _spawn(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_another_process_commits_are_picked_up(tmp_path):
    """A reader with the background poller sees another process's add and remove, with no
    restart; ``refresh`` alone does the same for a reader without the thread."""
    path = tmp_path / "g"
    writer = new_gallery(path)
    writer.add([item(i) for i in range(10)], np.stack([vector(i) for i in range(10)]))
    reader = GalleryIndex.open(path, device="cpu")
    plain = GalleryIndex.open(path, device="cpu")
    reader.start_background(poll_s=0.05)
    try:
        done = _spawn(
            """
            import sys
            import numpy as np
            from vvireid.indexer.store import GalleryIndex, GalleryItem
            from vvireid.model.types import Modality
            index = GalleryIndex.open(sys.argv[1], device="cpu")
            index.remove(["t3"])
            vec = np.random.default_rng(99).standard_normal(8).astype(np.float32)
            index.add([GalleryItem("t99", Modality.INFRARED, 2)], vec[None], [b"thumb99"])
            """,
            str(path),
        )
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 10
        while ("t99" not in reader or "t3" in reader) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "t99" in reader and "t3" not in reader and len(reader) == 10
        assert reader.thumbnail("t99") == b"thumb99"
        top = reader.search(vector(99), 1, modality=Modality.INFRARED)[0][0]
        assert top.tracklet_id == "t99" and top.score == pytest.approx(1.0, abs=1e-5)
        assert reader._mem.vindex.ntotal == 10
        assert "t99" not in plain and plain.refresh() == 2 and "t99" in plain
        assert plain.refresh() == 0  # nothing new: cheap no-op
        # The first handle, which wrote before, follows too, and can write again.
        writer.refresh()
        writer.add([item(50)], vector(50)[None])
        assert len(writer) == 11
    finally:
        reader.close()
        plain.close()
        writer.close()


def test_background_thread_writes_snapshots_that_open_uses(tmp_path, caplog):
    path = tmp_path / "g"
    index = new_gallery(path)
    index.add([item(0)], vector(0)[None])
    index.start_background(poll_s=0.02, snapshot_every=5, snapshot_fraction=0.5)
    try:
        for i in range(1, 9):
            index.add([item(i)], vector(i)[None])
        deadline = time.monotonic() + 10
        while index.stats()["snapshot_seq"] < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert index.stats()["snapshot_seq"] >= 5
    finally:
        index.close()
    with caplog.at_level("INFO", logger="vvireid.indexer.store"):
        reopened = GalleryIndex.open(path, device="cpu")
    assert "loaded snapshot" in caplog.text and "rebuilding" not in caplog.text
    assert len(reopened) == 9 and reopened._mem.vindex.ntotal == 9


@pytest.mark.slow  # the CLI process imports torch: about 5 s here
def test_cli_remove_while_a_reader_has_it_open(tmp_path):
    """``vvireid-index remove`` on a gallery that another process has open: no conflict."""
    path = tmp_path / "g"
    reader = new_gallery(path)
    reader.add([item(i) for i in range(5)], np.stack([vector(i) for i in range(5)]))
    done = subprocess.run(
        [sys.executable, "-m", "vvireid.indexer", "remove", str(path), "--tracklet-id", "t1"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["removed"] == 1
    assert reader.refresh() == 1 and "t1" not in reader and len(reader) == 4
    reader.close()


def test_change_log_is_pruned_behind_the_snapshot(tmp_path, monkeypatch):
    """The log stays bounded; a reader that lagged past the pruned point reloads, and an old
    snapshot that can no longer be replayed is rebuilt."""
    from vvireid.indexer import store

    monkeypatch.setattr(store, "CHANGES_KEPT", 3)
    path = tmp_path / "g"
    writer = new_gallery(path)
    writer.add([item(0)], vector(0)[None])
    lagging = GalleryIndex.open(path, device="cpu")
    old_snapshot = tmp_path / "old.faiss"
    writer.save()
    (path / "snapshot.faiss").replace(old_snapshot)
    for i in range(1, 12):
        writer.add([item(i)], vector(i)[None])
    writer.remove(["t5"])
    writer.save()
    conn = sqlite3.connect(path / DB_NAME)
    kept = conn.execute("SELECT count(*) FROM changes").fetchone()[0]
    conn.close()
    assert kept == 3  # 13 changes, pruned to the 3 behind the snapshot
    assert lagging.refresh() > 0 and len(lagging) == 11 and "t5" not in lagging
    assert lagging._mem.vindex.ntotal == 11
    writer.add([item(20)], vector(20)[None])  # after pruning, seqs go on
    assert lagging.refresh() == 1 and "t20" in lagging
    old_snapshot.replace(path / "snapshot.faiss")  # a snapshot from before the pruned point
    reopened = GalleryIndex.open(path, device="cpu")
    assert sorted(reopened.tracklet_ids()) == sorted(writer.tracklet_ids())
    assert reopened._mem.vindex.ntotal == 12


def test_busy_database_gives_a_clear_error_and_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(db, "BUSY_TIMEOUT_S", 0.2)
    path = tmp_path / "g"
    index = new_gallery(path)
    index.add([item(0)], vector(0)[None])
    other = sqlite3.connect(path / DB_NAME, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    try:
        index.close()
        index = GalleryIndex.open(path, device="cpu")  # opens with the short busy timeout
        with pytest.raises(GalleryBusyError, match="busy.*retry"):
            index.add([item(1)], vector(1)[None])
        with pytest.raises(GalleryBusyError):
            index.remove(["t0"])
        assert index.tracklet_ids() == ["t0"]
    finally:
        other.execute("ROLLBACK")
        other.close()
    index.add([item(1)], vector(1)[None])  # free again: the same call succeeds
    assert len(index) == 2 and len(GalleryIndex.open(path)) == 2


def test_full_disk_and_read_only_leave_memory_equal_to_disk(tmp_path):
    """A failed commit (SQLite's own disk-full and read-only errors) changes nothing anywhere."""
    path = tmp_path / "g"
    index = new_gallery(path)
    index.add([item(i) for i in range(20)], np.stack([vector(i) for i in range(20)]))
    before = disk_state(path)
    pages = index._conn.execute("PRAGMA page_count").fetchone()[0]
    index._conn.execute(f"PRAGMA max_page_count={pages}")  # the "disk" is now full
    big = [b"x" * 200_000]
    with pytest.raises(GalleryWriteError, match="disk full.*committed data is intact"):
        index.add([item(100)], vector(100)[None], big)
    assert "t100" not in index and len(index) == 20 and disk_state(path) == before
    index._conn.execute("PRAGMA query_only=ON")  # the database refuses writes
    with pytest.raises(GalleryWriteError, match="read-only"):
        index.remove(["t3"])
    assert "t3" in index and index.get("t3") == item(3) and disk_state(path) == before
    assert len(index.search(vector(3), 20)[0]) == 20
    index.close()
    reopened = GalleryIndex.open(path)
    assert sorted(reopened.tracklet_ids()) == sorted(before)


@pytest.fixture
def read_only_view(tmp_path):
    """``view(folder)`` -> a read-only bind mount of ``folder`` (skips where mounts are denied)."""
    mounts: list[Path] = []

    def view(folder: Path) -> Path:
        target = tmp_path / f"ro-{len(mounts)}"
        target.mkdir()
        done = subprocess.run(
            f"mount --bind '{folder}' '{target}' && mount -o remount,bind,ro '{target}'",
            shell=True, capture_output=True, check=False,
        )
        if done.returncode:
            subprocess.run(["umount", str(target)], capture_output=True, check=False)
            pytest.skip("needs permission to make a read-only bind mount")
        mounts.append(target)
        return target

    yield view
    for target in mounts:
        subprocess.run(["umount", str(target)], capture_output=True, check=False)


def test_read_only_folder_serves_and_refuses_writes_clearly(tmp_path, read_only_view, caplog):
    """A gallery on a read-only mount (a query-only server) opens frozen: searches and
    thumbnails work, a write is a clear error that changes nothing."""
    path = tmp_path / "g"
    index = new_gallery(path)
    index.add([item(i) for i in range(4)], np.stack([vector(i) for i in range(4)]), [b"j"] * 4)
    index.save()
    index.close()
    view = read_only_view(path)
    with caplog.at_level("WARNING"):
        frozen = GalleryIndex.open(view, device="cpu")
    assert "read-only" in caplog.text
    try:
        assert len(frozen) == 4 and frozen.thumbnail("t2") == b"j"
        assert frozen.search(vector(2), 1)[0][0].tracklet_id == "t2"
        with pytest.raises(GalleryWriteError, match="read-only"):
            frozen.add([item(9)], vector(9)[None])
        with pytest.raises(GalleryWriteError, match="read-only"):
            frozen.remove(["t1"])
        assert len(frozen) == 4 and "t1" in frozen and "t9" not in frozen
    finally:
        frozen.close()
    old = tmp_path / "old"
    write_format_1(old, 3, removed=set())
    with pytest.raises(GalleryWriteError, match="read-only folder.*migrate"):
        GalleryIndex.open(read_only_view(old), device="cpu")


def test_snapshot_into_an_unwritable_folder_is_a_clear_error(tmp_path):
    path = tmp_path / "g"
    index = new_gallery(path)
    index.add([item(0)], vector(0)[None])
    (path / "snapshot.faiss").mkdir()  # a snapshot cannot replace a folder
    with pytest.raises(OSError):
        index.save()
    assert len(index) == 1 and len(GalleryIndex.open(path)) == 1


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_open_files_do_not_grow_with_adds(tmp_path):
    index = new_gallery(tmp_path / "g")
    index.add([item(0)], vector(0)[None], [b"t"])
    index.thumbnail("t0")
    before = _open_fds()
    for i in range(1, 301):
        index.add([item(i)], vector(i)[None], [b"jpeg%d" % i])
        assert index.thumbnail(f"t{i}") == b"jpeg%d" % i
    assert _open_fds() <= before + 1
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == [
        DB_NAME, f"{DB_NAME}-shm", f"{DB_NAME}-wal"
    ]


def _sha(file: Path) -> dict:
    return {"name": file.name, "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
            "bytes": file.stat().st_size}


def write_format_1(path: Path, n: int, removed: set[int]) -> None:
    """A format-1 folder as the previous release wrote it (flat index, items, thumbnails)."""
    path.mkdir(parents=True)
    ids = np.asarray([i for i in range(n) if i not in removed], dtype=np.int64)
    vectors = np.stack([vector(i) for i in ids.tolist()])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    flat = faiss.index_factory(DIM, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
    flat.add_with_ids(vectors, ids)
    faiss.write_index(flat, str(path / "index.000003.faiss"))
    thumbs = b"".join(b"jpeg%03d" % i for i in ids.tolist())
    (path / "thumbs.000003.bin").write_bytes(thumbs)
    lines = [
        json.dumps({"id": i, **item(i).to_dict(), "thumb": ["thumbs.000003.bin", 7 * k, 7]})
        for k, i in enumerate(ids.tolist())
    ]
    (path / "items.000003.jsonl").write_text("".join(line + "\n" for line in lines))
    manifest = {
        "format": "vvireid.index", "format_version": 1, "generation": 3, "dim": DIM,
        "metric": "inner_product", "similarity": "cosine", "index_type": "flat",
        "index_params": {"nlist": 0, "nprobe": 0, "pq_m": 0, "rerank": 0},
        "model_fingerprint": "fp", "model_config": {"method": "baseline"}, "next_id": n,
        "files": {
            "index": _sha(path / "index.000003.faiss"),
            "items": _sha(path / "items.000003.jsonl"),
            "thumbnails": [_sha(path / "thumbs.000003.bin")],
        },
    }
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_format_1_folder_is_converted_once_at_open(tmp_path, caplog):
    path = tmp_path / "old"
    write_format_1(path, 12, removed={4})
    with caplog.at_level("WARNING"):
        index = GalleryIndex.open(path, expected_fingerprint="fp", device="cpu")
    assert "converted the format-1 index" in caplog.text
    assert sorted(p.name for p in path.iterdir()) == [DB_NAME, "snapshot.faiss"] or {
        DB_NAME, "snapshot.faiss"} <= {p.name for p in path.iterdir()}
    assert not (path / "manifest.json").exists() and not list(path.glob("items.*"))
    assert len(index) == 11 and "t4" not in index and index.get("t7") == item(7)
    assert index.thumbnail("t7") == b"jpeg007"
    assert index.search(vector(5), 1)[0][0].tracklet_id == "t5"
    index.add([GalleryItem("new", Modality.VISIBLE, 0)], vector(40)[None])
    rows = sqlite3.connect(path / DB_NAME).execute(
        "SELECT id FROM tracklets WHERE tracklet_id = 'new'"
    ).fetchall()
    assert rows == [(12,)]  # ids of format 1 (next_id 12) are never reused
    index.close()
    with caplog.at_level("INFO"):
        caplog.clear()
        again = GalleryIndex.open(path, device="cpu")
    assert "converted" not in caplog.text and len(again) == 12


@pytest.mark.slow  # runs the CLI in a process
def test_interrupted_conversion_keeps_the_old_files(tmp_path, monkeypatch):
    path = tmp_path / "old"
    write_format_1(path, 6, removed=set())
    before = sorted(p.name for p in path.iterdir())
    real = os.replace

    def refuse(src, dst):
        if str(dst).endswith(DB_NAME):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        GalleryIndex.open(path, device="cpu")
    assert sorted(p.name for p in path.iterdir()) == before  # nothing new, nothing lost
    monkeypatch.undo()
    done = subprocess.run(
        [sys.executable, "-m", "vvireid.indexer", "migrate", str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["converted"] == 6
    assert len(GalleryIndex.open(path, device="cpu")) == 6


def test_corrupt_format_1_file_is_named_and_nothing_converted(tmp_path):
    path = tmp_path / "old"
    write_format_1(path, 6, removed=set())
    target = path / "items.000003.jsonl"
    target.write_text(target.read_text().replace('"t2"', '"t2-edited"'))
    with pytest.raises(ValueError, match="items.000003.jsonl.*checksum"):
        GalleryIndex.open(path, device="cpu")
    assert (path / "manifest.json").exists() and not (path / DB_NAME).exists()
