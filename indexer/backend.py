"""The FAISS side of the gallery index: index construction, filtered search, GPU copies.

Everything here works on int64 *internal ids* (assigned by the gallery database, never reused)
and float32 vectors; tracklet metadata and the vectors themselves live in the database
(:mod:`vvireid.indexer.db`). This index is a derived, in-memory structure that can always be
rebuilt from there, so it is kept behind this small class.

Index types:

* ``flat``: ``IDMap2,Flat`` with inner product. Exact, no training, removal supported. The default,
  right for galleries up to a few million tracklets.
* ``ivf``: ``IVF{nlist},Flat``. Approximate (visits ``nprobe`` of ``nlist`` clusters) but the scores
  it returns are exact. Needs training data: at least ``39 * 16`` vectors.
* ``ivfpq``: ``IVF{nlist},PQ{m}x8`` (about ``m`` bytes per vector) plus a re-ranking of a
  shortlist of ``rerank * k`` candidates with the float vectors stored in the database (read
  through ``fetch_exact``), because PQ alone scrambles the order of near-duplicates
  (10-recall@10 0.39 without, 0.998 with a 10x flat re-rank).

Filters (gallery modality, cameras) are a bitmap over internal ids. On CPU they go into FAISS as an
``IDSelectorBitmap`` so a flat search returns exactly ``min(k, matching)`` hits; IVF widens
``nprobe`` until it has them. Query batches on a flat index over-fetch without the selector
instead (when at least 1/8 of the gallery matches), because a selector disables FAISS's BLAS path.
GPU indexes take no selectors, so the GPU path over-fetches and filters, growing the fetch until
every query has its hits, and hands over to the CPU index past the GPU's largest k.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO

import faiss
import numpy as np
import torch
from vvireid.indexer.torch_search import TorchExactSearch

log = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "ivf", "ivfpq")
DEFAULT_BLAS_THRESHOLD = 20
BLAS_THRESHOLD_ENV = "VVIREID_FAISS_BLAS_THRESHOLD"
MIN_NLIST = 16
POINTS_PER_CENTROID = 39  # FAISS warns below 39 training points per centroid
PQ_NBITS = 8
GPU_MAX_K = 2048  # largest k (and nprobe) FAISS GPU indexes accept
GPU_SHARD_MIN = 1_000_000  # from this size, spread the index over all GPUs
OVERFETCH_MAX_RATIO = 8  # filtered batches over-fetch when >= 1/8 of the gallery matches


THREADS_ENV = "VVIREID_FAISS_THREADS"


def configure_faiss(blas_threshold: int | None = None) -> int:
    """Set FAISS's global ``distance_compute_blas_threshold``; returns the value used.

    faiss 1.15 ships 128000, which makes batches of 2-128 queries scan the whole database once
    per query; 20 (the classic default) lets them use one BLAS matrix product, 6-7x faster for
    32-128 queries (reference 2.6 A, re-measured by ``benchmarks/search.py``). Override with the
    ``VVIREID_FAISS_BLAS_THRESHOLD`` environment variable or the argument.
    ``VVIREID_FAISS_THREADS`` sets FAISS's OpenMP thread count.
    """
    if blas_threshold is None:
        raw = os.environ.get(BLAS_THRESHOLD_ENV, "")
        try:
            blas_threshold = int(raw) if raw else DEFAULT_BLAS_THRESHOLD
        except ValueError:
            raise ValueError(f"{BLAS_THRESHOLD_ENV}={raw!r} is not an integer") from None
    faiss.cvar.distance_compute_blas_threshold = int(blas_threshold)
    threads = os.environ.get(THREADS_ENV, "")
    if threads:
        # Concurrent searches each spawn an OpenMP team; on a busy box fewer threads per search
        # avoid oversubscription (reference 2.3).
        try:
            faiss.omp_set_num_threads(max(1, int(threads)))
        except ValueError:
            raise ValueError(f"{THREADS_ENV}={threads!r} is not an integer") from None
    return int(blas_threshold)


@dataclass
class IndexParams:
    """Tunables of the approximate index types (zero where not applicable)."""

    nlist: int = 0
    nprobe: int = 0
    pq_m: int = 0
    rerank: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexParams:
        return cls(**{k: int(data.get(k, 0)) for k in ("nlist", "nprobe", "pq_m", "rerank")})


def min_train_size(index_type: str) -> int:
    """Vectors needed before an index of this type can be trained (0 = no training)."""
    if index_type == "ivf":
        return POINTS_PER_CENTROID * MIN_NLIST
    if index_type == "ivfpq":
        return POINTS_PER_CENTROID * (1 << PQ_NBITS)
    return 0


def choose_params(index_type: str, num_train: int, dim: int) -> IndexParams:
    """Pick nlist ~ 4 sqrt(N) (bounded by the training data), nprobe, PQ width for ``dim``."""
    if index_type == "flat":
        return IndexParams()
    nlist = max(MIN_NLIST, min(int(4 * math.sqrt(num_train)), num_train // POINTS_PER_CENTROID))
    nprobe = min(nlist, max(16, nlist // 8))
    if index_type == "ivf":
        return IndexParams(nlist=nlist, nprobe=nprobe)
    pq_m = max(m for m in range(1, min(64, max(1, dim // 2)) + 1) if dim % m == 0)
    return IndexParams(nlist=nlist, nprobe=nprobe, pq_m=pq_m, rerank=10)


def _factory_string(index_type: str, params: IndexParams) -> str:
    if index_type == "flat":
        return "IDMap2,Flat"
    if index_type == "ivf":
        return f"IVF{params.nlist},Flat"
    return f"IVF{params.nlist},PQ{params.pq_m}x{PQ_NBITS}"


def prepare_vectors(vectors: np.ndarray, dim: int, similarity: str, what: str) -> np.ndarray:
    """Check a [N, dim] (or [dim]) batch for any gallery backend; L2-normalise it for cosine.

    Raises:
        ValueError: naming ``what`` and the wrong shape or the rows holding NaN/inf.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"{what} must be [N, {dim}], got {list(vectors.shape)}")
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if len(bad):
        raise ValueError(f"{what}: rows {bad[:10].tolist()} hold NaN or infinite values")
    if similarity == "cosine":
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        if not np.allclose(norms, 1.0, atol=1e-4):  # encoder output already is: skip the copy
            vectors = vectors / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(vectors, dtype=np.float32)


class Selection:
    """The gallery items a search may return: a bitmap over internal ids and a FAISS selector."""

    def __init__(self, ids: np.ndarray, id_bound: int, headroom: int = 0) -> None:
        mask = np.zeros(max(id_bound + headroom, 1), dtype=bool)
        mask[ids] = True
        self.count = int(len(ids))
        self.bitmap = np.packbits(mask, bitorder="little")
        # The selector points into self.bitmap, which must stay alive as long as it does.
        self.selector = faiss.IDSelectorBitmap(len(self.bitmap), faiss.swig_ptr(self.bitmap))

    def update(self, added: np.ndarray, removed: np.ndarray) -> bool:
        """Set the bits of ``added`` and clear those of ``removed`` in place (callers hold the
        write lock); False when an added id lies beyond the bitmap (then build a new one)."""
        if len(added) and int(added.max()) >= len(self.bitmap) * 8:
            return False
        removed = removed[(removed >= 0) & (removed < len(self.bitmap) * 8)]
        self.count -= int(self.contains(removed).sum())
        np.bitwise_and.at(
            self.bitmap, removed >> 3, ~(np.uint8(1) << (removed & 7).astype(np.uint8))
        )
        fresh = added[~self.contains(added)]
        np.bitwise_or.at(self.bitmap, fresh >> 3, np.uint8(1) << (fresh & 7).astype(np.uint8))
        self.count += len(fresh)
        return True

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask of ``ids`` (any shape, -1 = empty slot) that are selected."""
        inside = (ids >= 0) & ((ids >> 3) < len(self.bitmap))
        safe = np.where(inside, ids, 0)
        bits = (self.bitmap[safe >> 3] >> (safe & 7).astype(np.uint8)) & 1
        return inside & bits.astype(bool)


ExactFetcher = Callable[[np.ndarray], dict[int, np.ndarray]]


class VectorIndex:
    """A FAISS index over internal ids; ``ivfpq`` re-ranks with vectors from ``fetch_exact``.

    Not thread-safe for writes: the store serialises ``add``/``remove`` against searches.
    Concurrent CPU searches are safe; GPU searches are funnelled through one lock because FAISS
    GPU resources are not thread-safe (reference 2.3).
    """

    def __init__(self, index_type: str, dim: int, params: IndexParams, index: Any = None) -> None:
        if index_type not in INDEX_TYPES:
            raise ValueError(f"unknown index type {index_type!r}; known: {', '.join(INDEX_TYPES)}")
        self.index_type = index_type
        self.dim = dim
        self.params = params
        if index is None:
            # Untrained IVF placeholder (so an empty index can be saved); train() replaces it.
            shape = params if index_type == "flat" else choose_params(index_type, 0, dim)
            index = faiss.index_factory(
                dim, _factory_string(index_type, shape), faiss.METRIC_INNER_PRODUCT
            )
        self.index = index
        self.fetch_exact: ExactFetcher | None = None
        self._gpu: Any = None
        self._gpu_res: Any = None
        self._gpu_stale = True
        self._gpu_lock = threading.Lock()
        self.use_gpu = False
        # Exact torch search on a CUDA device when FAISS has no GPU support (flat indexes only).
        self.torch_search: TorchExactSearch | None = None
        self._torch_stale = True

    # ---- state -----------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    @property
    def keeps_exact(self) -> bool:
        """Whether search re-ranks with the stored float vectors (only PQ loses them)."""
        return self.index_type == "ivfpq"

    def train(self, vectors: np.ndarray) -> None:
        """Train an IVF index on ``vectors`` (choosing nlist from their number).

        Raises:
            ValueError: with fewer vectors than the type needs, suggesting the flat index.
        """
        need = min_train_size(self.index_type)
        if len(vectors) < need:
            raise ValueError(
                f"an {self.index_type} index needs at least {need} vectors to train, got "
                f"{len(vectors)}; use index type 'flat' (exact, fine up to a few million tracklets)"
            )
        tuned = choose_params(self.index_type, len(vectors), self.dim)
        self.params = IndexParams(
            nlist=tuned.nlist,
            nprobe=self.params.nprobe or tuned.nprobe,
            pq_m=tuned.pq_m,
            rerank=self.params.rerank or tuned.rerank,
        )
        self.index = faiss.index_factory(
            self.dim, _factory_string(self.index_type, self.params), faiss.METRIC_INNER_PRODUCT
        )
        if self.index_type == "ivfpq":
            # Polysemous codes are never used here; training them costs minutes (48 s, 10k x 16).
            self.index.do_polysemous_training = False
        log.info(
            "training %s (nlist %d) on %d vectors", self.index_type, self.params.nlist, len(vectors)
        )
        self.index.train(np.ascontiguousarray(vectors, dtype=np.float32))
        self._gpu_stale = True
        self._torch_stale = True

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under ``ids`` (each larger than every id already present)."""
        if not self.is_trained:
            self.train(vectors)
        if len(ids):
            self.index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64)
            )
            if self.torch_search is not None and not self._torch_stale:
                self.torch_search.add(ids, vectors)
        self._gpu_stale = True

    def remove(self, ids: np.ndarray) -> None:
        """Remove ``ids`` (ids not present are ignored)."""
        if self.ntotal and len(ids):
            self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
            if self.torch_search is not None and not self._torch_stale:
                self.torch_search.remove(np.asarray(ids, np.int64))
        self._gpu_stale = True

    def ids(self) -> np.ndarray:
        """Every id held (flat: from the id map; IVF: from the inverted lists)."""
        if self.index_type == "flat":
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        ivf = faiss.extract_index_ivf(self.index)
        lists = ivf.invlists
        parts = [
            faiss.rev_swig_ptr(lists.get_ids(n), lists.list_size(n)).copy()
            for n in range(ivf.nlist)
            if lists.list_size(n)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Float vectors of ``ids`` as stored in the index (exact for flat and ivf, lossy for PQ)."""
        if self.index_type != "flat":
            ivf = faiss.extract_index_ivf(self.index)
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return self.index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))

    # ---- files -----------------------------------------------------------------------------

    def write_to(self, handle: BinaryIO) -> None:
        """Stream the FAISS index into an open binary file (no second copy in memory)."""
        faiss.write_index(self.index, faiss.PyCallbackIOWriter(handle.write))

    @classmethod
    def read_from(
        cls, index_type: str, dim: int, params: IndexParams, handle: BinaryIO
    ) -> VectorIndex:
        """Read an index written by :meth:`write_to` from the handle's current position."""
        return cls(index_type, dim, params, faiss.read_index(faiss.PyCallbackIOReader(handle.read)))

    # ---- GPU ---------------------------------------------------------------------------------

    def enable_gpu(self, torch_device: torch.device | None = None) -> str:
        """Choose where searches run from now on; returns that choice, for logs and /v1/index.

        ``faiss-gpu`` when FAISS has GPU support and sees a GPU; otherwise, for a flat index and
        a CUDA ``torch_device``, ``torch-cuda`` (exact matmul + top-k, :mod:`torch_search`);
        otherwise ``cpu`` (FAISS on the CPU, which IVF and IVF-PQ always use without FAISS-GPU).
        """
        self.use_gpu = faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources")
        self._gpu_stale = True
        self.torch_search = None
        if self.use_gpu:
            return "faiss-gpu"
        if self.index_type == "flat" and torch_device is not None:
            self.torch_search = TorchExactSearch(torch_device)
            self._torch_stale = True
            return f"torch-{torch_device.type}"
        return "cpu"

    def _torch_copy(self) -> TorchExactSearch | None:
        """The torch copy, rebuilt from the FAISS index when a retrain or reload made it stale."""
        if self.torch_search is not None and self._torch_stale:
            ids = self.ids()
            vectors = self.reconstruct(ids) if len(ids) else np.zeros((0, self.dim), np.float32)
            self.torch_search.rebuild(ids, vectors)
            self._torch_stale = False
        return self.torch_search

    def _gpu_index(self) -> Any:
        """The GPU copy, re-cloned lazily after writes (called with ``_gpu_lock`` held)."""
        if not self._gpu_stale:
            return self._gpu
        self._gpu = None
        self._gpu_stale = False
        if not self.ntotal:
            return None
        try:
            if faiss.get_num_gpus() > 1 and self.ntotal >= GPU_SHARD_MIN:
                options = faiss.GpuMultipleClonerOptions()
                options.shard = True
                self._gpu = faiss.index_cpu_to_all_gpus(self.index, co=options)
            else:
                self._gpu_res = faiss.StandardGpuResources()
                self._gpu = faiss.index_cpu_to_gpu(self._gpu_res, 0, self.index)
        except RuntimeError as exc:  # e.g. a PQ width the GPU kernels lack
            log.warning(
                "cannot copy the %s index to the GPU (%s); searching on CPU", self.index_type, exc
            )
            self.use_gpu = False
        return self._gpu

    # ---- search ------------------------------------------------------------------------------

    def search(
        self, queries: np.ndarray, k: int, selection: Selection | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` (scores, internal ids) per query, -1 ids padding rows with fewer matches.

        Every row holds ``min(k, matching)`` results where ``matching`` is the selection size
        (the gallery size without a selection); IVF types guarantee it by widening nprobe.
        """
        matching = self.ntotal if selection is None else selection.count
        want = min(k, matching)
        if want == 0 or not len(queries):
            return (
                np.full((len(queries), k), -np.inf, np.float32),
                np.full((len(queries), k), -1, np.int64),
            )
        fetch = min(matching, want * self.params.rerank) if self.keeps_exact else want
        scores, ids = None, None
        if self.use_gpu:
            scores, ids = self._search_gpu(queries, fetch, want, selection)
        elif self.torch_search is not None:
            with self._gpu_lock:
                exact = self._torch_copy()
                keep = None if selection is None else selection.contains(exact.ids_np)
                scores, ids = exact.search(queries, fetch, keep)
        if ids is None:
            scores, ids = self._search_cpu(queries, fetch, want, selection)
        if self.keeps_exact:
            scores, ids = self._rerank(queries, ids, want)
        return _pad(scores, ids, k)

    def _search_cpu(
        self, queries: np.ndarray, fetch: int, want: int, selection: Selection | None
    ) -> tuple[np.ndarray, np.ndarray]:
        sel = None if selection is None else selection.selector
        if self.index_type == "flat":
            if sel is not None and self._overfetch_pays(len(queries), selection):
                return self._search_flat_overfetch(queries, fetch, want, selection)
            params = None if sel is None else faiss.SearchParameters(sel=sel)
            return self.index.search(queries, fetch, params=params)
        nprobe = max(1, min(self.params.nprobe, self.params.nlist))
        scores, ids = self.index.search(
            queries, fetch, params=faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        )
        short = np.flatnonzero((ids >= 0).sum(1) < want)
        while len(short) and nprobe < self.params.nlist:
            # Too few matches in the probed clusters (a strict filter): look at more clusters.
            nprobe = min(self.params.nlist, nprobe * 4)
            params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
            scores[short], ids[short] = self.index.search(queries[short], fetch, params=params)
            short = short[(ids[short] >= 0).sum(1) < want]
        return scores, ids

    def _overfetch_pays(self, num_queries: int, selection: Selection) -> bool:
        """Whether a batch should skip the selector to get FAISS's BLAS path (see below)."""
        blas = num_queries >= faiss.cvar.distance_compute_blas_threshold
        return blas and selection.count * OVERFETCH_MAX_RATIO >= self.ntotal

    def _search_flat_overfetch(
        self, queries: np.ndarray, fetch: int, want: int, selection: Selection
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact filtered flat search for query batches via an unfiltered BLAS search.

        FAISS scans query by query whenever a selector is given (no BLAS), which makes the
        default cross-modal filter (half of the gallery) several times slower for batches.
        Searching unfiltered for enough extra candidates and dropping the others gives the same
        top results; rows that got too few matches are redone with the selector.
        """
        total = self.ntotal
        extra = min(total, math.ceil(fetch * total / selection.count * 1.25) + 16)
        scores, ids = self.index.search(queries, extra)
        scores, ids = _compact(scores, ids, selection.contains(ids))
        scores, ids = scores[:, :fetch].copy(), ids[:, :fetch].copy()
        short = np.flatnonzero((ids >= 0).sum(1) < want)
        if len(short):
            params = faiss.SearchParameters(sel=selection.selector)
            scores[short], ids[short] = self.index.search(queries[short], fetch, params=params)
        return scores, ids

    def _search_gpu(
        self, queries: np.ndarray, fetch: int, want: int, selection: Selection | None
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Over-fetch and filter on the GPU; (None, None) when the CPU must answer instead."""
        total = self.ntotal
        if selection is not None:
            fetch = min(total, max(fetch, math.ceil(fetch * total / max(selection.count, 1) * 1.5)))
        with self._gpu_lock:
            index = self._gpu_index()
            if index is None or not self.use_gpu:
                return None, None
            if self.index_type != "flat":
                faiss.GpuParameterSpace().set_index_parameter(
                    index, "nprobe", min(self.params.nprobe, self.params.nlist, GPU_MAX_K)
                )
            while fetch <= GPU_MAX_K:
                scores, ids = index.search(queries, fetch)
                if selection is None:
                    return scores, ids
                keep = selection.contains(ids)
                if keep.sum(1).min() >= want or fetch >= total:
                    return _compact(scores, ids, keep)
                fetch = min(total, fetch * 4)
        return None, None

    def _rerank(
        self, queries: np.ndarray, ids: np.ndarray, want: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of the PQ shortlist (stored vectors), best ``want`` kept.

        A candidate whose stored vector is gone (removed by a commit that this index has not
        applied yet) is dropped rather than scored from its PQ code.
        """
        if self.fetch_exact is None:
            raise RuntimeError("ivfpq search needs fetch_exact (the stored vectors)")
        unique = np.unique(ids[ids >= 0])
        stored = self.fetch_exact(unique)
        table = np.zeros((len(unique) + 1, self.dim), dtype=np.float32)
        present = np.zeros(len(unique) + 1, dtype=bool)
        for row, internal in enumerate(unique.tolist()):
            vector = stored.get(internal)
            if vector is not None:
                table[row], present[row] = vector, True
        rows = np.where(ids >= 0, np.searchsorted(unique, np.maximum(ids, 0)), len(unique))
        valid = present[rows]
        vectors = table[rows.reshape(-1)].reshape(*ids.shape, self.dim)
        scores = np.einsum("qd,qcd->qc", queries, vectors).astype(np.float32)
        scores[~valid] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :want]
        ids = np.take_along_axis(np.where(valid, ids, -1), order, axis=1)
        return np.take_along_axis(scores, order, axis=1), ids


def _compact(
    scores: np.ndarray, ids: np.ndarray, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Move kept entries of each row to the front (order preserved), -1 after them."""
    order = np.argsort(~keep, axis=1, kind="stable")
    ids = np.where(
        np.take_along_axis(keep, order, axis=1), np.take_along_axis(ids, order, axis=1), -1
    )
    return np.take_along_axis(scores, order, axis=1), ids


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut or pad rows to exactly k columns (-1 ids, -inf scores)."""
    scores, ids = scores[:, :k], ids[:, :k]
    if ids.shape[1] < k:
        extra = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, extra)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, extra)), constant_values=-np.inf)
    scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
    return scores, ids.astype(np.int64)
