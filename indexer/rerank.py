"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) of a query's top-K shortlist.

Why only the shortlist: the published method builds an (Q+G) x (Q+G) distance matrix, which is
quadratic in the gallery (hours and tens of GB on a million tracklets). Here each query is
re-ranked on its own, over the local set {query} + its K nearest gallery items, so the cost is
O(K^2) per query whatever the gallery size, and a server can afford it per request. When K covers
the whole gallery the result equals the published algorithm run with that single query (the tests
check this against a loop-by-loop transcription of the paper).

Distances are squared Euclidean distances between L2-normalised features (``2 - 2 cos``), as in
the paper's code, whatever similarity the model ranks with: k-reciprocal sets only need a sound
notion of "near", and normalised features give one for VLD's inner products too.

The final distance is ``(1 - lambda) * jaccard + lambda * original`` where ``original`` is the
column-max-normalised squared distance; both lie in [0, 1], so items outside the shortlist are
placed after it (:func:`rerank_distances` adds 2 to their original distance).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vvireid.indexer.gallery import GalleryBackend
    from vvireid.indexer.store import Hit

_BEYOND_SHORTLIST = 2.0


@dataclass(frozen=True)
class RerankParams:
    """Hyper-parameters of the paper: k1 (reciprocal sets), k2 (query expansion), lambda."""

    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    shortlist: int = 100

    def __post_init__(self) -> None:
        if self.k1 < 1 or self.k2 < 1 or self.shortlist < 1:
            raise ValueError(
                f"re-ranking needs k1, k2 and shortlist >= 1, got k1={self.k1}, k2={self.k2}, "
                f"shortlist={self.shortlist}"
            )
        if not 0.0 <= self.lambda_value <= 1.0:
            raise ValueError(f"re-ranking lambda must be in [0, 1], got {self.lambda_value}")


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def _reciprocal(rank: np.ndarray, k: int) -> np.ndarray:
    """Boolean [n, n]: j is among i's k+1 nearest and i among j's (the k-reciprocal sets)."""
    n = len(rank)
    near = np.zeros((n, n), dtype=bool)
    near[np.arange(n)[:, None], rank[:, : k + 1]] = True
    return near & near.T


def local_rerank(features: np.ndarray, params: RerankParams = RerankParams()) -> np.ndarray:
    """Re-ranked distances from item 0 (the query) to items 1..n-1 (its shortlist).

    Shape: features [n, D] (row 0 the query) -> distances [n - 1] (lower is closer).
    """
    feats = _normalise(features)
    n = len(feats)
    if n < 2:
        return np.zeros(0, dtype=np.float64)
    squared = np.maximum(2.0 - 2.0 * feats @ feats.T, 0.0)
    np.fill_diagonal(squared, 0.0)
    original = (squared / np.maximum(squared.max(axis=0), 1e-12)).T
    rank = np.argsort(original, axis=1, kind="stable")
    reciprocal = _reciprocal(rank, params.k1)
    half = _reciprocal(rank, int(np.around(params.k1 / 2.0)))
    # Expansion: add a member's half-size reciprocal set when 2/3 of it is already in the set.
    # Float matmuls (BLAS; exact for counts this small) instead of integer ones (no BLAS).
    overlap = half.astype(np.float64) @ reciprocal.T.astype(np.float64)  # [c, i] = |Rh(c) & R(i)|
    bound = (2.0 / 3.0) * half.sum(axis=1)
    accepted = reciprocal & np.greater(overlap.T, bound[None, :])
    expanded = reciprocal | ((accepted.astype(np.float64) @ half.astype(np.float64)) > 0)
    weights = np.where(expanded, np.exp(-original), 0.0)
    encoding = weights / weights.sum(axis=1, keepdims=True)
    if params.k2 != 1:
        encoding = encoding[rank[:, : params.k2]].mean(axis=1)
    shared = np.minimum(encoding[0][None, :], encoding).sum(axis=1)
    jaccard = 1.0 - shared / (2.0 - shared)
    final = (1.0 - params.lambda_value) * jaccard + params.lambda_value * original[0]
    return final[1:]


def rerank_distances(
    query: np.ndarray, gallery: np.ndarray, params: RerankParams = RerankParams()
) -> np.ndarray:
    """A query x gallery distance matrix with each row's top-``shortlist`` re-ranked.

    Items outside a query's shortlist keep their original order, after the shortlist. Used by
    ``vvireid-train eval --rerank``; the cost is Q x shortlist^2, never Q x G^2.

    Shape: query [Q, D], gallery [G, D] -> distances [Q, G] float64.
    """
    q, g = _normalise(query), _normalise(gallery)
    base = np.maximum(2.0 - 2.0 * q @ g.T, 0.0)
    out = base + _BEYOND_SHORTLIST
    size = min(params.shortlist, g.shape[0])
    for row in range(len(q)):
        top = np.argsort(base[row], kind="stable")[:size]
        out[row, top] = local_rerank(np.concatenate([q[row : row + 1], g[top]]), params)
    return out


def rerank_hits(
    index: GalleryBackend,
    query: np.ndarray,
    hits: Sequence[Hit],
    top_k: int,
    params: RerankParams = RerankParams(),
) -> list[Hit]:
    """Re-order one query's shortlist ``hits`` (from ``index.search``) and keep ``top_k``.

    The hits keep their original ``score`` (the similarity), so thresholds and calibrated
    probabilities mean the same with and without re-ranking; only ``rank`` and the order change.
    """
    if not hits:
        return []
    vectors = index.vectors([h.tracklet_id for h in hits])
    distances = local_rerank(np.concatenate([np.asarray(query, np.float64)[None, :], vectors]),
                             params)
    order = np.argsort(distances, kind="stable")[:top_k]
    return [replace(hits[i], rank=rank) for rank, i in enumerate(order.tolist(), start=1)]
