"""One contract, two backends: the FAISS ``GalleryIndex`` and ``MilvusGallery`` on a real Milvus Lite
file must agree on every observable behaviour (same rankings with exact indexes, same scores,
same filters, same errors). Expected rankings come from a numpy brute force, not from either
backend, so a shared bug cannot pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from vvireid.indexer.gallery import (
    BackendOptions,
    GalleryBackend,
    GalleryUnavailableError,
    create_gallery,
    gallery_modality,
    open_gallery,
)
from vvireid.indexer.store import GalleryItem, IndexMismatchError
from vvireid.model.types import Modality

DIM = 16
N = 40
FINGERPRINT = "fp-contract-1"
BACKENDS = ("faiss", "milvus")


def _options(backend: str, tmp_path: Path) -> BackendOptions:
    if backend == "faiss":
        return BackendOptions()
    return BackendOptions(backend="milvus", milvus_uri=str(tmp_path / "milvus.db"))


def _location(backend: str, tmp_path: Path) -> Path:
    return tmp_path / ("gallery" if backend == "faiss" else "contract_gallery")


def _make(backend: str, tmp_path: Path, **kw) -> GalleryBackend:
    return create_gallery(
        _location(backend, tmp_path),
        _options(backend, tmp_path),
        dim=DIM,
        model_fingerprint=kw.pop("fingerprint", FINGERPRINT),
        similarity=kw.pop("similarity", "cosine"),
        model_config={"method": "vld"},
        device="cpu",
        **kw,
    )


def _reopen(backend: str, tmp_path: Path, **kw) -> GalleryBackend:
    return open_gallery(
        _location(backend, tmp_path), _options(backend, tmp_path), device="cpu", **kw
    )


def _data(seed: int = 0) -> tuple[list[GalleryItem], np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((N, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = [
        GalleryItem(
            tracklet_id=f"t{i:03d}",
            modality=Modality(i % 2),
            camid=i % 4,
            camera=f"cam{i % 4}",
            pid=i // 3,
            timestamp=1000.0 + i,
            frames=(f"f{i}/0.jpg", f"f{i}/1.jpg"),
        )
        for i in range(N)
    ]
    return items, vectors


def _expected(
    items: list[GalleryItem],
    vectors: np.ndarray,
    query: np.ndarray,
    k: int,
    modality: Modality | None = None,
    camids: set[int] | None = None,
) -> tuple[list[str], np.ndarray]:
    """Brute-force ranking and scores over the matching items."""
    keep = [
        i
        for i, it in enumerate(items)
        if (modality is None or it.modality == modality) and (camids is None or it.camid in camids)
    ]
    q = query / np.linalg.norm(query)
    scores = vectors[keep] @ q
    order = np.argsort(-scores)[:k]
    return [items[keep[i]].tracklet_id for i in order], scores[order]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def filled(backend: str, tmp_path: Path):
    items, vectors = _data()
    gallery = _make(backend, tmp_path)
    thumbs = [b"\xff\xd8jpeg-%d\xff\xd9" % i if i % 5 == 0 else None for i in range(N)]
    gallery.add(items, vectors, thumbs)
    gallery.save()
    yield gallery, items, vectors
    gallery.close()


def test_satisfies_protocol(filled) -> None:
    gallery, _, _ = filled
    assert isinstance(gallery, GalleryBackend)


def test_add_get_count_contains(filled) -> None:
    gallery, items, _ = filled
    assert len(gallery) == N
    assert "t007" in gallery and "nope" not in gallery
    assert gallery.get("t007") == items[7]
    assert gallery.get("nope") is None
    assert sorted(gallery.tracklet_ids()) == sorted(it.tracklet_id for it in items)


def test_thumbnails(filled) -> None:
    gallery, _, _ = filled
    assert gallery.thumbnail("t005") == b"\xff\xd8jpeg-5\xff\xd9"
    assert gallery.thumbnail("t006") is None
    assert gallery.thumbnail("nope") is None


@pytest.mark.parametrize(
    ("modality", "camids"),
    [(None, None), (Modality.VISIBLE, None), (Modality.INFRARED, {1, 3}), (None, {2})],
)
def test_search_matches_brute_force(filled, modality, camids) -> None:
    gallery, items, vectors = filled
    queries = np.random.default_rng(1).standard_normal((3, DIM)).astype(np.float32) * 3.0
    hits = gallery.search(queries, 5, modality=modality, camids=camids)
    assert len(hits) == 3
    for query, row in zip(queries, hits, strict=True):
        ids, scores = _expected(items, vectors, query, 5, modality, camids)
        assert [h.tracklet_id for h in row] == ids
        assert [h.rank for h in row] == list(range(1, len(ids) + 1))
        np.testing.assert_allclose([h.score for h in row], scores, atol=1e-5)
        for hit in row:
            item = items[int(hit.tracklet_id[1:])]
            assert (hit.modality, hit.camid, hit.camera, hit.pid, hit.timestamp) == (
                item.modality, item.camid, item.camera, item.pid, item.timestamp,
            )


def test_cross_modal_default_and_modality_names(filled) -> None:
    gallery, _, vectors = filled
    wanted = gallery_modality(Modality.INFRARED)  # ir_to_vis
    assert wanted == Modality.VISIBLE
    by_enum = gallery.search(vectors[1], 4, modality=wanted)[0]
    by_name = gallery.search(vectors[1], 4, modality="visible")[0]
    assert [h.tracklet_id for h in by_enum] == [h.tracklet_id for h in by_name]
    assert all(h.modality == Modality.VISIBLE for h in by_enum)
    assert gallery_modality("visible", "any") is None


def test_k_larger_than_matches_and_empty_camera_list(filled) -> None:
    gallery, items, vectors = filled
    matching = [it for it in items if it.modality == Modality.VISIBLE and it.camid == 0]
    row = gallery.search(vectors[0], 100, modality=Modality.VISIBLE, camids=[0])[0]
    assert sorted(h.tracklet_id for h in row) == sorted(it.tracklet_id for it in matching)
    assert gallery.search(vectors[0], 3, camids=[])[0] == []
    assert gallery.search(vectors[0], 3, camids=[99])[0] == []


def test_remove(filled) -> None:
    gallery, items, vectors = filled
    assert gallery.remove(["t000", "t002"]) == 2
    gallery.save()
    assert len(gallery) == N - 2 and "t000" not in gallery
    top = gallery.search(vectors[0], 3)[0]
    assert "t000" not in [h.tracklet_id for h in top]
    rest_items = [it for it in items if it.tracklet_id not in ("t000", "t002")]
    rest_vectors = np.stack([vectors[int(it.tracklet_id[1:])] for it in rest_items])
    ids, _ = _expected(rest_items, rest_vectors, vectors[0], 3)
    assert [h.tracklet_id for h in top] == ids


def test_remove_missing_removes_nothing(filled) -> None:
    gallery, _, _ = filled
    with pytest.raises(KeyError, match="nope"):
        gallery.remove(["t001", "nope"])
    assert "t001" in gallery and len(gallery) == N


def test_duplicate_add_refused_and_nothing_added(filled) -> None:
    gallery, items, vectors = filled
    fresh = GalleryItem("new1", Modality.VISIBLE, 0)
    with pytest.raises(ValueError, match="t003"):
        gallery.add([fresh, items[3]], vectors[:2])
    assert "new1" not in gallery and len(gallery) == N
    with pytest.raises(ValueError, match="new2"):
        gallery.add([GalleryItem("new2", Modality.VISIBLE, 0)] * 2, vectors[:2])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("wrong_dim", r"\[N, 16\]"),
        ("nan", "NaN"),
        ("count", "2 items but 3 vector rows"),
        ("empty_id", "tracklet_id"),
        ("negative_camid", "camid"),
        ("thumb_count", "thumbnails"),
    ],
)
def test_bad_add_input(backend: str, tmp_path: Path, change: str, message: str) -> None:
    gallery = _make(backend, tmp_path)
    items, vectors = _data()
    items, vectors, thumbs = items[:2], vectors[:2], None
    if change == "wrong_dim":
        vectors = np.ones((2, DIM + 1), np.float32)
    elif change == "nan":
        vectors = vectors.copy()
        vectors[1, 3] = np.nan
    elif change == "count":
        vectors = _data()[1][:3]
    elif change == "empty_id":
        items = [GalleryItem(" ", Modality.VISIBLE, 0), items[1]]
    elif change == "negative_camid":
        items = [GalleryItem("x", Modality.VISIBLE, -1), items[1]]
    else:
        thumbs = [None]
    with pytest.raises(ValueError, match=message):
        gallery.add(items, vectors, thumbs)
    assert len(gallery) == 0
    gallery.close()


def test_bad_search_input(filled) -> None:
    gallery, _, _ = filled
    with pytest.raises(ValueError, match="k must be"):
        gallery.search(np.ones(DIM, np.float32), 0)
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        gallery.search(np.ones(DIM + 2, np.float32), 3)
    with pytest.raises(ValueError, match="NaN"):
        gallery.search(np.full(DIM, np.nan, np.float32), 3)
    with pytest.raises(ValueError, match="modality"):
        gallery.search(np.ones(DIM, np.float32), 3, modality="ultraviolet")


def test_persists_and_guards_the_model(filled, backend: str, tmp_path: Path) -> None:
    gallery, _, vectors = filled
    before = [h.tracklet_id for h in gallery.search(vectors[4], 5)[0]]
    gallery.close()
    with pytest.raises(IndexMismatchError, match="fingerprint other-model"):
        _reopen(backend, tmp_path, expected_fingerprint="other-model")
    with pytest.raises(IndexMismatchError, match="32-d"):
        _reopen(backend, tmp_path, expected_dim=32)
    again = _reopen(backend, tmp_path, expected_fingerprint=FINGERPRINT, expected_dim=DIM)
    try:
        assert len(again) == N
        assert again.fingerprint == FINGERPRINT and again.dim == DIM
        assert again.similarity == "cosine"
        assert [h.tracklet_id for h in again.search(vectors[4], 5)[0]] == before
        stats = again.stats()
        assert stats["count"] == N and stats["per_modality"]["visible"]["count"] == N // 2
        assert stats["per_modality"]["infrared"]["by_camid"] == {"1": 10, "3": 10}
        assert stats["model_fingerprint"] == FINGERPRINT
    finally:
        again.close()


def test_create_refuses_existing(filled, backend: str, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError):
        _make(backend, tmp_path)


def test_inner_product_scores_are_raw_dot_products(backend: str, tmp_path: Path) -> None:
    gallery = _make(backend, tmp_path, similarity="inner_product")
    items, vectors = _data()
    scaled = vectors * np.linspace(0.5, 2.0, N, dtype=np.float32)[:, None]
    gallery.add(items, scaled)
    query = np.random.default_rng(3).standard_normal(DIM).astype(np.float32)
    row = gallery.search(query, 4)[0]
    expected = np.sort(scaled @ query)[::-1][:4]
    np.testing.assert_allclose([h.score for h in row], expected, rtol=1e-5, atol=1e-5)
    gallery.close()


def test_milvus_unreachable_names_the_uri() -> None:
    options = BackendOptions(backend="milvus", milvus_uri="http://127.0.0.1:9", timeout_s=2)
    with pytest.raises(GalleryUnavailableError, match="127.0.0.1:9"):
        open_gallery("g", options)


def test_milvus_reconnects_after_a_lost_client(tmp_path: Path) -> None:
    gallery = _make("milvus", tmp_path)
    items, vectors = _data()
    gallery.add(items, vectors)
    gallery._client.close()  # the connection dies under the gallery's feet
    with pytest.raises(GalleryUnavailableError, match="retry later"):
        gallery.search(vectors[0], 3)
    assert gallery.search(vectors[0], 3)[0][0].tracklet_id == "t000"  # reconnected
    gallery.close()


def test_backend_options_read_credentials_from_env_and_files(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    options = BackendOptions.from_env(
        environ={
            "VVIREID_BACKEND": "milvus",
            "VVIREID_MILVUS_URI": "http://db:19530",
            "VVIREID_MILVUS_TOKEN_FILE": str(token_file),
        }
    )
    assert (options.backend, options.milvus_uri, options.token) == (
        "milvus", "http://db:19530", "s3cret",
    )
    assert "s3cret" not in options.describe()
    with pytest.raises(ValueError, match="VVIREID_MILVUS_PASSWORD_FILE"):
        BackendOptions.from_env(
            "milvus", "x.db", environ={"VVIREID_MILVUS_PASSWORD_FILE": str(tmp_path / "none")}
        )
    with pytest.raises(ValueError, match="needs a Milvus URI"):
        BackendOptions.from_env("milvus", environ={})
    with pytest.raises(ValueError, match="backend must be"):
        BackendOptions(backend="qdrant")


def test_vectors_come_back_in_the_order_asked(filled) -> None:
    gallery, _, vectors = filled
    got = gallery.vectors(["t009", "t001"])
    np.testing.assert_allclose(got, vectors[[9, 1]], atol=1e-6)
    with pytest.raises(KeyError, match="nope"):
        gallery.vectors(["t001", "nope"])
