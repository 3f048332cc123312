"""GalleryIndex on random vectors: exact search, filters, add/remove, persistence, atomicity."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
from vvireid.indexer.store import (
    MANIFEST,
    GalleryIndex,
    GalleryItem,
    IndexConflictError,
    IndexFormatError,
    IndexMismatchError,
)
from vvireid.model.types import Modality

DIM = 16


def items_for(n: int, start: int = 0, cams: int = 4) -> list[GalleryItem]:
    return [
        GalleryItem(
            f"g{i}",
            Modality(i % 2),
            i % cams,
            camera=f"cam{i % cams}",
            pid=i // 2,
            timestamp=float(i),
            frames=(f"/frames/g{i}/0.jpg",),
        )
        for i in range(start, start + n)
    ]


def new_index(
    path: Path, similarity: str = "cosine", index_type: str = "flat", **kw
) -> GalleryIndex:
    return GalleryIndex.create(
        path,
        dim=DIM,
        model_fingerprint="fp-a",
        similarity=similarity,
        index_type=index_type,
        model_config={"method": "baseline"},
        **kw,
    )


def brute_force(
    gallery: np.ndarray,
    items: list[GalleryItem],
    queries: np.ndarray,
    k: int,
    similarity: str,
    modality=None,
    camids=None,
) -> list[list[str]]:
    if similarity == "cosine":
        gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    keep = np.array(
        [
            (modality is None or it.modality == modality) and (camids is None or it.camid in camids)
            for it in items
        ]
    )
    scores = queries @ gallery.T
    scores[:, ~keep] = -np.inf
    out = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[: min(k, int(keep.sum()))]
        out.append([items[j].tracklet_id for j in order])
    return out


@pytest.mark.parametrize("num_queries", [7, 40])  # 40: batched (BLAS + over-fetch) path
@pytest.mark.parametrize("similarity", ["cosine", "inner_product"])
@pytest.mark.parametrize(
    ("modality", "camids", "k"),
    [
        (None, None, 10),
        (Modality.VISIBLE, None, 10),
        (Modality.INFRARED, {1, 3}, 5),
        (Modality.INFRARED, {3}, 50),  # k larger than the matching set: all of it, nothing else
        (None, {2}, 200),
    ],
)
def test_flat_search_equals_brute_force(tmp_path, similarity, modality, camids, k, num_queries):
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((120, DIM)).astype(np.float32)
    queries = rng.standard_normal((num_queries, DIM)).astype(np.float32)
    items = items_for(120)
    index = new_index(tmp_path / "idx", similarity)
    index.add(items, gallery)
    results = index.search(queries, k, modality=modality, camids=camids)
    expected = brute_force(gallery, items, queries, k, similarity, modality, camids)
    assert [[h.tracklet_id for h in hits] for hits in results] == expected
    for hits in results:
        assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))
        assert all(modality is None or h.modality == modality for h in hits)
        assert all(camids is None or h.camid in camids for h in hits)


def test_batched_filtered_search_when_matches_rank_last(tmp_path):
    """Over-fetching finds no match when every match scores below every other item: those rows
    must fall back to the filtered search and still return the best matches, in order."""
    rng = np.random.default_rng(8)
    direction = rng.standard_normal(DIM).astype(np.float32)
    visible = direction + 0.1 * rng.standard_normal((300, DIM)).astype(np.float32)
    infrared = -direction + 0.1 * rng.standard_normal((100, DIM)).astype(np.float32)
    items = [GalleryItem(f"v{i}", Modality.VISIBLE, 0) for i in range(300)]
    items += [GalleryItem(f"i{i}", Modality.INFRARED, 1) for i in range(100)]
    gallery = np.concatenate([visible, infrared])
    index = new_index(tmp_path / "idx")
    index.add(items, gallery)
    queries = (direction + 0.1 * rng.standard_normal((32, DIM))).astype(np.float32)
    results = index.search(queries, 10, modality=Modality.INFRARED)
    expected = brute_force(gallery, items, queries, 10, "cosine", Modality.INFRARED)
    assert [[h.tracklet_id for h in row] for row in results] == expected


def test_rare_filter_still_returns_exactly_k(tmp_path):
    """A camera holding 1% of the gallery: exactly k hits, all from it (flat and IVF)."""
    rng = np.random.default_rng(2)
    n = 2000
    gallery = rng.standard_normal((n, DIM)).astype(np.float32)
    items = [GalleryItem(f"g{i}", Modality(i % 2), 9 if i % 200 < 2 else 0) for i in range(n)]
    for index_type in ("flat", "ivf"):
        index = new_index(tmp_path / index_type, index_type=index_type, nprobe=1)
        index.add(items, gallery)
        hits = index.search(gallery[:3], 15, camids=[9])
        assert [len(h) for h in hits] == [15, 15, 15]
        assert all(h.camid == 9 for row in hits for h in row)
        hits = index.search(gallery[:3], 15, modality=Modality.INFRARED, camids=[9])
        assert [len(h) for h in hits] == [10, 10, 10]  # only 10 such items exist


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """10k clustered vectors (200 identities x 50 views), 20 queries, and a saved ivfpq index of
    them (training PQ takes seconds, so the tests share it)."""
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((200, DIM)).astype(np.float32)
    gallery = (np.repeat(centres, 50, axis=0) + 0.3 * rng.standard_normal((10000, DIM))).astype(
        np.float32
    )
    queries = (centres[:20] + 0.3 * rng.standard_normal((20, DIM))).astype(np.float32)
    items = items_for(10000)
    path = tmp_path_factory.mktemp("clustered") / "ivfpq"
    index = new_index(path, index_type="ivfpq")
    index.add(items, gallery, [b"a%d" % i for i in range(10000)])
    index.save()
    return path, gallery, items, queries


def test_ivf_and_ivfpq_recall_against_exact(tmp_path, clustered):
    ivfpq_path, gallery, items, queries = clustered
    exact = new_index(tmp_path / "flat")
    exact.add(items, gallery)
    truth = [{h.tracklet_id for h in row} for row in exact.search(queries, 10)]
    ivf = new_index(tmp_path / "ivf", index_type="ivf")
    ivf.add(items, gallery)
    ivf.save()
    for index in (GalleryIndex.open(tmp_path / "ivf"), GalleryIndex.open(ivfpq_path)):
        found = index.search(queries, 10)
        recall = np.mean(
            [len(truth[q] & {h.tracklet_id for h in row}) / 10 for q, row in enumerate(found)]
        )
        assert recall >= 0.9, (index.index_type, recall)
        assert index.stats()["index_params"]["nlist"] >= 16


def test_ivf_refuses_too_few_vectors(tmp_path):
    index = new_index(tmp_path / "idx", index_type="ivf")
    with pytest.raises(ValueError, match="needs at least .* use index type 'flat'"):
        index.add(items_for(50), np.ones((50, DIM), np.float32))
    assert len(index) == 0


def test_add_remove_round_trip_persists(tmp_path):
    rng = np.random.default_rng(4)
    gallery = rng.standard_normal((40, DIM)).astype(np.float32)
    items = items_for(40)
    path = tmp_path / "idx"
    index = new_index(path)
    index.add(items, gallery, [f"jpeg-{i}".encode() for i in range(40)])
    index.save()

    index = GalleryIndex.open(path, expected_fingerprint="fp-a")
    assert index.remove(["g3", "g5", "g3"]) == 2
    assert "g3" not in index and index.get("g3") is None and index.thumbnail("g3") is None
    for row in index.search(gallery, 40):
        assert {"g3", "g5"}.isdisjoint(h.tracklet_id for h in row)
        assert len(row) == 38
    with pytest.raises(KeyError, match="g3"):
        index.remove(["g4", "g3"])  # all or nothing
    assert "g4" in index
    index.save()

    index = GalleryIndex.open(path)
    assert len(index) == 38 and "g5" not in index
    assert index.thumbnail("g7") == b"jpeg-7"
    assert index.get("g7") == items[7]
    index.add([items[3]], gallery[3:4], [b"again"])  # re-adding a removed id works
    with pytest.raises(ValueError, match="g4"):
        index.add([items[4]], gallery[4:5])
    index.save()

    index = GalleryIndex.open(path)
    assert len(index) == 39 and index.thumbnail("g3") == b"again"
    assert index.search(gallery[3], 1, modality=items[3].modality)[0][0].tracklet_id == "g3"
    stats = index.stats()
    assert stats["count"] == 39 and stats["per_modality"]["visible"]["count"] == 20
    assert stats["per_modality"]["infrared"]["by_camid"] == {"1": 9, "3": 10}  # g5 (camid 1) gone
    assert stats["per_modality"]["infrared"]["camera_names"] == {"1": "cam1", "3": "cam3"}
    assert stats["model_fingerprint"] == "fp-a" and stats["dim"] == DIM


def test_thumbnails_survive_compaction(tmp_path):
    path = tmp_path / "idx"
    index = new_index(path)
    big = [bytes([i]) * 400_000 for i in range(6)]
    index.add(items_for(6), np.eye(6, DIM, dtype=np.float32) + 0.1, big)
    index.save()
    index.remove(["g0", "g1", "g2", "g3"])
    index.save()
    names = sorted(p.name for p in path.glob("thumbs.*"))
    assert names == ["thumbs.000002.bin"]  # compacted: the first segment is gone
    assert (path / names[0]).stat().st_size == 800_000
    reopened = GalleryIndex.open(path)
    assert reopened.thumbnail("g4") == big[4] and reopened.thumbnail("g5") == big[5]


def test_mismatched_model_is_refused(tmp_path):
    index = new_index(tmp_path / "idx")
    index.add(items_for(4), np.ones((4, DIM), np.float32))
    index.save()
    with pytest.raises(IndexMismatchError, match="fp-a.*fp-b"):
        GalleryIndex.open(tmp_path / "idx", expected_fingerprint="fp-b")
    with pytest.raises(IndexMismatchError, match="16-d"):
        GalleryIndex.open(tmp_path / "idx", expected_dim=32)


@pytest.mark.parametrize("pattern", ["index.*.faiss", "items.*.jsonl", "thumbs.*.bin"])
def test_corrupted_file_is_refused_by_name(tmp_path, pattern):
    path = tmp_path / "idx"
    index = new_index(path)
    index.add(items_for(8), np.random.default_rng(0).standard_normal((8, DIM)), [b"x" * 50] * 8)
    index.save()
    (target,) = path.glob(pattern)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match=f"{target.name}.*checksum"):
        GalleryIndex.open(path)


def test_missing_or_bad_manifest_is_named(tmp_path):
    with pytest.raises(IndexFormatError, match="manifest.json: missing"):
        GalleryIndex.open(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(IndexFormatError, match="manifest.json: not a readable"):
        GalleryIndex.open(tmp_path)


def _state(path: Path, queries: np.ndarray) -> tuple:
    index = GalleryIndex.open(path, expected_fingerprint="fp-a")
    hits = [[h.tracklet_id for h in row] for row in index.search(queries, 5)]
    return sorted(index.tracklet_ids()), hits, {t: index.thumbnail(t) for t in index.tracklet_ids()}


class InjectedFault(OSError):
    pass


def _inject(monkeypatch: pytest.MonkeyPatch, fail_at: int) -> list[str]:
    """Make the ``fail_at``-th call to any file-system step of a save raise."""
    calls: list[str] = []

    def wrap(owner, name):
        real = getattr(owner, name)

        def step(*args, **kwargs):
            calls.append(name)
            if len(calls) - 1 == fail_at:
                raise InjectedFault(f"injected failure in {name}")
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, step)

    for owner, name in (
        (os, "open"),
        (os, "fsync"),
        (os, "replace"),
        (faiss, "write_index"),
        (np, "save"),
    ):
        wrap(owner, name)
    return calls


@pytest.mark.parametrize("index_type", ["flat", "ivfpq"])
def test_save_interrupted_at_any_step_keeps_previous_index(
    tmp_path, monkeypatch, index_type, clustered
):
    """Fail the i-th file-system step of a save, for every i: the folder then holds the previous
    index (when save raised) or the new one (when it returned), never anything else.

    The ivfpq variant only adds the exact-vector file to the same protocol, so it interrupts the
    steps around that file's write (a full sweep over a 10k index would take a minute).
    """
    path, pristine = tmp_path / "idx", tmp_path / "pristine"
    if index_type == "flat":
        n = 30
        gallery = np.random.default_rng(5).standard_normal((n + 10, DIM)).astype(np.float32)
        items = items_for(n + 10)
        index = new_index(path, index_type=index_type)
        index.add(items[:n], gallery[:n], [b"a%d" % i for i in range(n)])
        index.save()
        shutil.copytree(path, pristine)
    else:
        shutil.copytree(clustered[0], pristine)
        n = 10000
        gallery = np.concatenate(
            [clustered[1], np.random.default_rng(5).standard_normal((10, DIM))]
        )
        gallery = gallery.astype(np.float32)
        items = items_for(n + 10)
        shutil.copytree(pristine, path)
    queries = gallery[:4]
    before = _state(path, queries)

    def change_and_save(fail_at: int) -> tuple[bool, list[str]]:
        shutil.rmtree(path)
        shutil.copytree(pristine, path)
        index = GalleryIndex.open(path)
        index.remove(["g1", "g2"])
        index.add(items[n:], gallery[n:], [b"b%d" % i for i in range(10)])
        calls = _inject(monkeypatch, fail_at)
        try:
            index.save()
            return True, calls
        except InjectedFault:
            return False, calls
        finally:
            monkeypatch.undo()

    _, steps = change_and_save(-1)
    after_success = _state(path, queries)
    assert after_success != before and len(after_success[0]) == n + 8
    failed = 0
    window = range(len(steps))
    if index_type == "ivfpq":
        at = steps.index("save")
        window = range(at - 1, min(len(steps), at + 5))  # temp file, write, fsync, rename, dir
    for fail_at in window:
        ok, calls = change_and_save(fail_at)
        expected = after_success if ok else before
        assert _state(path, queries) == expected, f"save failing at step {fail_at} ({calls[-1]})"
        assert [p.name for p in path.iterdir() if p.name.endswith(".tmp")] == []
        failed += not ok
    assert failed >= (8 if index_type == "flat" else 4), steps


def test_files_of_a_killed_save_are_ignored_then_removed(tmp_path):
    path = tmp_path / "idx"
    index = new_index(path)
    index.add(items_for(5), np.ones((5, DIM), np.float32))
    index.save()
    for junk in ("index.000002.faiss", "items.000002.jsonl", ".manifest.json.abc.tmp"):
        (path / junk).write_bytes(b"half-written")
    index = GalleryIndex.open(path)
    assert len(index) == 5
    index.remove(["g0"])
    index.save()
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".lock")) == [
        "index.000002.faiss",
        "items.000002.jsonl",
        MANIFEST,
    ]
    assert len(GalleryIndex.open(path)) == 4


def test_second_writer_is_refused(tmp_path):
    path = tmp_path / "idx"
    index = new_index(path)
    index.add(items_for(5), np.ones((5, DIM), np.float32))
    index.save()
    first, second = GalleryIndex.open(path), GalleryIndex.open(path)
    first.remove(["g0"])
    first.save()
    second.remove(["g1"])
    with pytest.raises(IndexConflictError, match="reopen"):
        second.save()
    assert sorted(GalleryIndex.open(path).tracklet_ids()) == ["g1", "g2", "g3", "g4"]


def test_create_refuses_existing_index_unless_overwrite(tmp_path):
    path = tmp_path / "idx"
    index = new_index(path)
    index.add(items_for(3), np.ones((3, DIM), np.float32))
    index.save()
    with pytest.raises(FileExistsError):
        new_index(path)
    replacement = new_index(path, overwrite=True)
    assert len(GalleryIndex.open(path)) == 3  # untouched until the new one is saved
    replacement.add(items_for(2, start=10), np.ones((2, DIM), np.float32))
    replacement.save()
    assert sorted(GalleryIndex.open(path).tracklet_ids()) == ["g10", "g11"]


def test_concurrent_searches_with_writes(tmp_path):
    rng = np.random.default_rng(6)
    gallery = rng.standard_normal((400, DIM)).astype(np.float32)
    items = items_for(400)
    index = new_index(tmp_path / "idx")
    index.add(items[:200], gallery[:200])
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher() -> None:
        try:
            while not stop.is_set():
                for row in index.search(gallery[:8], 20, modality=Modality.VISIBLE):
                    assert len(row) == 20 and all(h.modality == Modality.VISIBLE for h in row)
                    assert all(a.score >= b.score for a, b in zip(row, row[1:], strict=False))
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(4)]
    for thread in threads:
        thread.start()
    for i in range(200, 400, 20):
        index.add(items[i : i + 20], gallery[i : i + 20])
        index.remove([items[i - 100].tracklet_id])
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(index) == 390


def test_manifest_records_checksums_and_model(tmp_path):
    path = tmp_path / "idx"
    index = new_index(path)
    index.add(items_for(6), np.ones((6, DIM), np.float32), [b"t"] * 6)
    index.save()
    header = json.loads((path / MANIFEST).read_text())
    assert header["format_version"] == 1 and header["metric"] == "inner_product"
    assert header["counts"] == {"visible": 3, "infrared": 3}
    assert header["model_config"] == {"method": "baseline"}
    for entry in [
        header["files"]["index"],
        header["files"]["items"],
        *header["files"]["thumbnails"],
    ]:
        assert (path / entry["name"]).stat().st_size == entry["bytes"] and len(
            entry["sha256"]
        ) == 64


@pytest.mark.gpu
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="needs a GPU visible to FAISS")
def test_gpu_search_matches_cpu(tmp_path):
    rng = np.random.default_rng(7)
    gallery = rng.standard_normal((3000, DIM)).astype(np.float32)
    items = items_for(3000)
    cpu = new_index(tmp_path / "cpu", device="cpu")
    gpu = new_index(tmp_path / "gpu", device="cuda")
    cpu.add(items, gallery)
    gpu.add(items, gallery)
    assert gpu.device == "cuda"
    for kwargs in ({}, {"modality": Modality.VISIBLE}, {"camids": [3]}):
        a = [[h.tracklet_id for h in r] for r in cpu.search(gallery[:16], 50, **kwargs)]
        b = [[h.tracklet_id for h in r] for r in gpu.search(gallery[:16], 50, **kwargs)]
        assert a == b


@pytest.mark.parametrize("index_type", ["flat", "ivf"])
def test_gpu_overfetch_logic_on_a_cpu_stand_in(tmp_path, monkeypatch, index_type):
    """The GPU path (no selectors: over-fetch, filter, grow) run against the CPU index, so its
    merging logic is checked on machines without a GPU; results must equal the CPU path's."""
    rng = np.random.default_rng(9)
    gallery = rng.standard_normal((1000, DIM)).astype(np.float32)
    items = [
        GalleryItem(f"g{i}", Modality(i % 2), 7 if i % 50 == 0 else i % 3) for i in range(1000)
    ]
    index = new_index(tmp_path / "idx", index_type=index_type, device="cpu", nprobe=1)
    index.add(items, gallery)
    if index_type == "ivf":
        index.nprobe = 1000  # exact, so both paths must agree exactly
    queries = gallery[:12]
    expected = {
        key: [[h.tracklet_id for h in r] for r in index.search(queries, 30, **kw)]
        for key, kw in {"all": {}, "vis": {"modality": "visible"}, "cam7": {"camids": [7]}}.items()
    }
    vindex = index._vindex
    monkeypatch.setattr(vindex, "_gpu_index", lambda: vindex.index)
    vindex.use_gpu = True
    for key, kw in {"all": {}, "vis": {"modality": "visible"}, "cam7": {"camids": [7]}}.items():
        got = [[h.tracklet_id for h in r] for r in index.search(queries, 30, **kw)]
        assert got == expected[key], key
    assert [len(r) for r in index.search(queries, 30, camids=[7])] == [20] * 12  # all 20 exist
