"""GalleryIndex on random vectors: exact search, filters, add/remove, persistence, snapshots.

Crash, multi-process and format-1 conversion tests are in ``test_live_gallery.py``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
from vvireid.indexer.store import (
    DB_NAME,
    SNAPSHOT,
    GalleryIndex,
    GalleryItem,
    IndexFormatError,
    IndexMismatchError,
    TrackletExistsError,
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
    index.close()

    index = GalleryIndex.open(path, expected_fingerprint="fp-a")
    assert index.remove(["g3", "g5", "g3"]) == 2
    assert "g3" not in index and index.get("g3") is None and index.thumbnail("g3") is None
    for row in index.search(gallery, 40):
        assert {"g3", "g5"}.isdisjoint(h.tracklet_id for h in row)
        assert len(row) == 38
    with pytest.raises(KeyError, match="g3"):
        index.remove(["g4", "g3"])  # all or nothing
    assert "g4" in index
    index.close()  # no save(): every change is committed when the call returns

    index = GalleryIndex.open(path)
    assert len(index) == 38 and "g5" not in index
    assert index.thumbnail("g7") == b"jpeg-7"
    assert index.get("g7") == items[7]
    index.add([items[3]], gallery[3:4], [b"again"])  # re-adding a removed id works
    with pytest.raises(TrackletExistsError, match="g4"):
        index.add([items[4]], gallery[4:5])
    with pytest.raises(TrackletExistsError, match="g90"):
        index.add(items_for(1, start=90) * 2, gallery[:2])
    index.close()

    index = GalleryIndex.open(path)
    assert len(index) == 39 and index.thumbnail("g3") == b"again"
    assert index.search(gallery[3], 1, modality=items[3].modality)[0][0].tracklet_id == "g3"
    stats = index.stats()
    assert stats["count"] == 39 and stats["per_modality"]["visible"]["count"] == 20
    assert stats["per_modality"]["infrared"]["by_camid"] == {"1": 9, "3": 10}  # g5 (camid 1) gone
    assert stats["per_modality"]["infrared"]["camera_names"] == {"1": "cam1", "3": "cam3"}
    assert stats["model_fingerprint"] == "fp-a" and stats["dim"] == DIM
    assert stats["thumbnails"] == 39


def test_cached_filters_follow_adds_and_removes(tmp_path):
    """Filter bitmaps are updated in place by writes (not rebuilt): results stay exact."""
    rng = np.random.default_rng(13)
    gallery = rng.standard_normal((300, DIM)).astype(np.float32)
    items = items_for(300)
    index = new_index(tmp_path / "idx")
    index.add(items[:100], gallery[:100])
    filters = [(Modality.VISIBLE, None), (Modality.INFRARED, {1, 3}), (None, {2})]
    live = list(range(100))
    for step in range(100, 300, 25):
        for modality, camids in filters:  # cache (or refresh) every filter's bitmap
            index.search(gallery[:3], 400, modality=modality, camids=camids)
        index.add(items[step : step + 25], gallery[step : step + 25])
        live += list(range(step, step + 25))
        gone = live[::7]
        index.remove([items[i].tracklet_id for i in gone])
        live = [i for i in live if i not in gone]
        for modality, camids in filters:
            got = index.search(gallery[:5], 400, modality=modality, camids=camids)
            want = brute_force(
                gallery[live], [items[i] for i in live], gallery[:5], 400, "cosine", modality,
                camids,
            )
            assert [[h.tracklet_id for h in row] for row in got] == want, (step, modality)


def test_gallery_index_satisfies_the_backend_protocol(tmp_path):
    from vvireid.indexer.gallery import GalleryBackend

    index = new_index(tmp_path / "idx")
    assert isinstance(index, GalleryBackend)


def test_mismatched_model_is_refused(tmp_path):
    index = new_index(tmp_path / "idx")
    index.add(items_for(4), np.ones((4, DIM), np.float32))
    with pytest.raises(IndexMismatchError, match="fp-a.*fp-b"):
        GalleryIndex.open(tmp_path / "idx", expected_fingerprint="fp-b")
    with pytest.raises(IndexMismatchError, match="16-d"):
        GalleryIndex.open(tmp_path / "idx", expected_dim=32)


def test_missing_or_corrupt_database_is_named(tmp_path):
    with pytest.raises(IndexFormatError, match=f"{DB_NAME}: missing"):
        GalleryIndex.open(tmp_path)
    (tmp_path / DB_NAME).write_bytes(b"garbage" * 1000)
    with pytest.raises(IndexFormatError, match=f"{DB_NAME}: not a readable gallery database"):
        GalleryIndex.open(tmp_path)


def _hits(index: GalleryIndex, queries: np.ndarray) -> list[list[str]]:
    return [[h.tracklet_id for h in row] for row in index.search(queries, 5)]


@pytest.mark.parametrize("damage", ["none", "missing", "corrupt", "stale"])
def test_snapshot_plus_replay_equals_a_rebuild(tmp_path, caplog, damage):
    """Open = snapshot + replay of newer changes; a missing or corrupt snapshot is logged and the
    index rebuilt from the database. Every way gives the same searches."""
    rng = np.random.default_rng(11)
    gallery = rng.standard_normal((60, DIM)).astype(np.float32)
    items = items_for(60)
    path = tmp_path / "idx"
    index = new_index(path)
    index.add(items[:40], gallery[:40])
    index.save()  # snapshot at this point
    index.remove(["g1", "g2"])
    index.add(items[40:], gallery[40:])  # after the snapshot: replayed at open
    expected = _hits(index, gallery[:6])
    index.close()
    snapshot = path / SNAPSHOT
    if damage == "missing":
        snapshot.unlink()
    elif damage == "corrupt":
        data = bytearray(snapshot.read_bytes())
        data[len(data) - 100] ^= 0xFF
        snapshot.write_bytes(bytes(data))
    elif damage == "stale":  # a snapshot of another gallery
        other = new_index(tmp_path / "other", index_type="flat")
        other.add(items[:3], gallery[:3])
        other.save()
        (tmp_path / "other" / SNAPSHOT).replace(snapshot)
    with caplog.at_level(logging.INFO, logger="vvireid.indexer.store"):
        reopened = GalleryIndex.open(path)
    assert len(reopened) == 58 and reopened._mem.vindex.ntotal == 58
    assert _hits(reopened, gallery[:6]) == expected
    rebuilt = "rebuilding the index from the database" in caplog.text
    assert rebuilt == (damage != "none"), caplog.text


def test_ivfpq_reranks_with_stored_vectors(tmp_path, clustered):
    """The exact re-ranking reads the vectors from the database: its scores are exact."""
    path, gallery, items, queries = clustered
    index = GalleryIndex.open(path)
    normed = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    for row, query in zip(index.search(queries, 5), q, strict=True):
        for hit in row:
            position = int(hit.tracklet_id[1:])
            assert hit.score == pytest.approx(float(normed[position] @ query), abs=1e-5)


def test_create_overwrite_keeps_the_old_gallery_until_the_first_commit(tmp_path):
    path = tmp_path / "idx"
    index = new_index(path)
    index.add(items_for(3), np.ones((3, DIM), np.float32))
    with pytest.raises(FileExistsError):
        new_index(path)
    replacement = new_index(path, overwrite=True)
    assert len(GalleryIndex.open(path)) == 3  # untouched until the new one commits
    replacement.add(items_for(2, start=10), np.ones((2, DIM), np.float32))
    assert sorted(GalleryIndex.open(path).tracklet_ids()) == ["g10", "g11"]
    index.refresh()  # the first handle follows the replacement too
    assert sorted(index.tracklet_ids()) == ["g10", "g11"]


def test_retrain_swaps_a_new_ivf_index(tmp_path):
    rng = np.random.default_rng(12)
    gallery = rng.standard_normal((800, DIM)).astype(np.float32)
    items = items_for(800)
    index = new_index(tmp_path / "idx", index_type="ivf")
    index.add(items[:700], gallery[:700])
    index.add(items[700:], gallery[700:])
    index.nprobe = 10_000
    before = _hits(index, gallery[:4])
    summary = index.retrain()
    assert summary["count"] == 800 and summary["index_params"]["nlist"] >= 16
    index.nprobe = 10_000
    assert _hits(index, gallery[:4]) == before  # all clusters probed: exact either way
    assert len(GalleryIndex.open(tmp_path / "idx")) == 800


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
    vindex = index._mem.vindex
    monkeypatch.setattr(vindex, "_gpu_index", lambda: vindex.index)
    vindex.use_gpu = True
    for key, kw in {"all": {}, "vis": {"modality": "visible"}, "cam7": {"camids": [7]}}.items():
        got = [[h.tracklet_id for h in r] for r in index.search(queries, 30, **kw)]
        assert got == expected[key], key
    assert [len(r) for r in index.search(queries, 30, camids=[7])] == [20] * 12  # all 20 exist
