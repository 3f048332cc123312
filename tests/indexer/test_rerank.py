"""Shortlist k-reciprocal re-ranking against a loop-by-loop transcription of the paper's
full-matrix algorithm (Zhong et al. CVPR 2017, section 3), on small random problems."""

from __future__ import annotations

import numpy as np
import pytest
from vvireid.indexer.rerank import RerankParams, local_rerank, rerank_distances, rerank_hits
from vvireid.indexer.store import GalleryIndex
from vvireid.model.types import Modality


def full_matrix_rerank(q: np.ndarray, g: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """The published algorithm over all probe + gallery items, written as plainly as possible."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    feats = np.concatenate([q, g]).astype(np.float64)
    n, nq = len(feats), len(q)
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            dist[i, j] = 0.0 if i == j else max(np.sum((feats[i] - feats[j]) ** 2), 0.0)
    colmax = dist.max(axis=0)
    orig = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            orig[i, j] = dist[j, i] / colmax[i]
    rank = np.argsort(orig, axis=1, kind="stable")

    def recip(i: int, k: int) -> list[int]:
        forward = list(rank[i, : k + 1])
        return [j for j in forward if i in list(rank[j, : k + 1])]

    V = np.zeros((n, n))
    for i in range(n):
        r = recip(i, k1)
        expansion = set(r)
        for c in r:
            rc = recip(c, int(np.around(k1 / 2.0)))
            if len(set(rc) & set(r)) > 2.0 / 3.0 * len(rc):
                expansion |= set(rc)
        idx = sorted(expansion)
        w = np.exp(-orig[i, idx])
        V[i, idx] = w / w.sum()
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(axis=0) for i in range(n)])
    out = np.zeros((nq, len(g)))
    for i in range(nq):
        for j in range(len(g)):
            m = sum(min(V[i, t], V[nq + j, t]) for t in range(n) if V[i, t] != 0)
            jac = 1.0 - m / (2.0 - m)
            out[i, j] = (1 - lam) * jac + lam * orig[i, nq + j]
    return out


@pytest.mark.parametrize(("k1", "k2", "lam", "size"), [(20, 6, 0.3, 40), (5, 3, 0.5, 25), (4, 1, 0.0, 12)])
def test_shortlist_covering_the_gallery_equals_the_full_matrix(k1, k2, lam, size):
    rng = np.random.default_rng(size)
    centres = rng.normal(size=(6, 8))
    gallery = centres[rng.integers(0, 6, size)] + 0.6 * rng.normal(size=(size, 8))
    queries = centres[:3] + 0.6 * rng.normal(size=(3, 8))
    params = RerankParams(k1=k1, k2=k2, lambda_value=lam, shortlist=size)
    ours = rerank_distances(queries, gallery, params)
    for qi in range(len(queries)):
        reference = full_matrix_rerank(queries[qi : qi + 1], gallery, k1, k2, lam)[0]
        np.testing.assert_allclose(ours[qi], reference, atol=1e-6, rtol=0)


def test_local_rerank_is_order_invariant_and_shortlist_goes_first():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(30, 8))
    perm = np.concatenate([[0], 1 + rng.permutation(29)])
    params = RerankParams(k1=6, k2=3)
    np.testing.assert_allclose(local_rerank(feats, params)[perm[1:] - 1],
                               local_rerank(feats[perm], params), atol=1e-12)
    dist = rerank_distances(feats[:2], feats[2:], RerankParams(k1=6, k2=3, shortlist=10))
    for row in dist:
        assert (np.sort(row)[:10] <= 1.0 + 1e-9).all() and (np.sort(row)[10:] >= 2.0).all()


def test_rerank_improves_map_on_clustered_features():
    """Identities as tight clusters with one outlier view: re-ranking pulls the outliers in."""
    from vvireid.training.evaluation import evaluate

    rng = np.random.default_rng(3)
    pids = np.repeat(np.arange(20), 6)
    centres = rng.normal(size=(20, 16))
    gallery = centres[pids] + 0.9 * rng.normal(size=(len(pids), 16))
    queries = centres + 0.9 * rng.normal(size=(20, 16))
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    gn = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    plain = evaluate(2 - 2 * qn @ gn.T, np.arange(20), pids, np.zeros(20), np.ones(len(pids)),
                        filter_same_camera=False)
    reranked = evaluate(rerank_distances(queries, gallery, RerankParams(k1=8, k2=3, shortlist=60)),
                        np.arange(20), pids, np.zeros(20), np.ones(len(pids)),
                        filter_same_camera=False)
    assert reranked.mAP > plain.mAP


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="k1"):
        RerankParams(k1=0)
    with pytest.raises(ValueError, match="lambda"):
        RerankParams(lambda_value=1.5)


@pytest.mark.parametrize("index_type", ["flat", "ivf"])
def test_rerank_hits_reads_the_shortlist_vectors_from_the_index(tmp_path, index_type):
    from vvireid.indexer.store import GalleryItem

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(700, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = GalleryIndex.create(tmp_path / "g", dim=8, model_fingerprint="x", similarity="cosine",
                                index_type=index_type, device="cpu")
    items = [GalleryItem(f"t{i}", Modality.VISIBLE, 0) for i in range(700)]
    index.add(items, vectors)
    np.testing.assert_allclose(index.vectors(["t5", "t0"]), vectors[[5, 0]], atol=1e-6)
    with pytest.raises(KeyError, match="nope"):
        index.vectors(["nope"])
    index.nprobe = 10_000
    hits = index.search(vectors[7], 40)[0]
    params = RerankParams(k1=6, k2=3, shortlist=40)
    top = rerank_hits(index, vectors[7], hits, 10, params)
    expected = local_rerank(np.concatenate([vectors[7:8], vectors[[int(h.tracklet_id[1:])
                                                                    for h in hits]]]), params)
    assert [h.tracklet_id for h in top] == [hits[i].tracklet_id for i in np.argsort(expected,
                                                                                    kind="stable")[:10]]
    assert [h.rank for h in top] == list(range(1, 11))
    assert top[0].tracklet_id == "t7"
