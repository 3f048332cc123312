"""Retrieval metrics (CMC, mAP, mINP) that reproduce the official VVI-ReID evaluators.

The algorithm is the one shared by MITML's ``evaluate`` (HITSZ-VCM), the BUPTCampus ``evaluate``
and their copies in VLD and X-ReID (docs/fidelity.md D5, D6):

* every query row of the distance matrix is ranked with ``np.argsort`` (numpy's default, unstable
  kind, ascending: a smaller distance is more similar), so tied distances are ordered exactly as
  the official code orders them;
* with ``filter_same_camera`` (the HITSZ-VCM protocol) gallery items with the query's pid AND the
  query's camid are removed and the ranks renumbered; people from that camera with another pid
  stay. BUPTCampus removes nothing;
* a query left without any positive is skipped: it counts in no denominator;
* CMC is the float32 mean of the clipped hit curves, AP the mean precision at each hit, and
  ``max_rank`` shrinks to the gallery size when the gallery is smaller.

mINP is not computed by any official VCM/BUPT evaluator. We report it with the AGW/SYSU definition
(``INP = R / rank of the last positive`` in the filtered list, averaged over valid queries) and it
is labelled *not official* wherever it is shown.

Speed: instead of a Python loop over the ranked gallery of every query, each block of query rows
is argsorted at once and only the positions of same-pid gallery items are kept (a sparse list of a
few per query). Camera filtering, rank renumbering, AP, INP and the CMC are then computed on that
sparse list with vectorised numpy. A 5,000 x 5,000 evaluation is dominated by the argsort, whose
blocks run on a few threads (numpy releases the GIL while sorting).
On a CUDA device the sort runs in torch; rows containing tied distances are re-sorted with numpy
so that results stay identical to the official code in every case.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from vvireid.model.device import resolve_device

log = logging.getLogger(__name__)

# Rows per block are chosen so a block of argsort indices stays around 32 MiB (int64).
_BLOCK_ELEMENTS = 1 << 22
_MAX_WORKERS = 8
_REPORTED_RANKS = (1, 5, 10, 20)
SIMILARITIES = ("inner_product", "cosine")


@dataclass(frozen=True, eq=False)
class EvalResult:
    """Metrics of one query/gallery direction.

    Attributes:
        cmc: float32 ``[max_rank]``; ``cmc[k-1]`` is the fraction of valid queries whose first
            positive is within rank ``k`` (after the camera filter).
        mAP: mean over valid queries of the average precision.
        mINP: mean inverse negative penalty (AGW definition; NOT computed by the official
            evaluators, reported for information only).
        num_valid_queries: queries with at least one positive left in the gallery; the others are
            skipped exactly as the official code skips them.
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid_queries: int

    def __post_init__(self) -> None:
        cmc = np.array(self.cmc, dtype=np.float32)
        cmc.setflags(write=False)
        object.__setattr__(self, "cmc", cmc)

    def to_dict(self) -> dict[str, float]:
        """R1/R5/R10/R20 (those within ``max_rank``), mAP and mINP as plain floats in [0, 1]."""
        out = {f"R{k}": float(self.cmc[k - 1]) for k in _REPORTED_RANKS if k <= len(self.cmc)}
        out["mAP"] = float(self.mAP)
        out["mINP"] = float(self.mINP)
        return out


def evaluate(
    distmat: np.ndarray | torch.Tensor,
    q_pids: Sequence[Any] | np.ndarray | torch.Tensor,
    g_pids: Sequence[Any] | np.ndarray | torch.Tensor,
    q_camids: Sequence[Any] | np.ndarray | torch.Tensor,
    g_camids: Sequence[Any] | np.ndarray | torch.Tensor,
    *,
    filter_same_camera: bool,
    max_rank: int = 20,
    device: str | torch.device = "auto",
) -> EvalResult:
    """CMC, mAP and mINP of a query x gallery distance matrix, as the official evaluators compute.

    Args:
        distmat: ``[nq, ng]`` distances, smaller = more similar. Its dtype is kept for sorting
            (MITML and VLD sort float64, BUPTCampus and X-ReID float32), because tie order
            depends on it.
        q_pids, g_pids: identity labels of queries and gallery items (any comparable values).
        q_camids, g_camids: camera labels.
        filter_same_camera: True for the HITSZ-VCM protocol (remove gallery items with the
            query's pid and camid), False for BUPTCampus (remove nothing).
        max_rank: length of the CMC curve; reduced to ``ng`` when the gallery is smaller.
        device: where to argsort: ``"auto"`` (CUDA when available), ``"cpu"`` (numpy) or a torch
            device such as ``"cuda:1"``. The result is identical on every device.

    Returns:
        An :class:`EvalResult`.

    Raises:
        ValueError: on malformed input (naming the argument), NaN distances, or when no query has
            a positive in the gallery (the official code fails on that too).
    """
    dist = _as_distmat(distmat)
    nq, ng = dist.shape
    q_pid, g_pid = _as_labels(q_pids, "q_pids", nq), _as_labels(g_pids, "g_pids", ng)
    q_cam, g_cam = _as_labels(q_camids, "q_camids", nq), _as_labels(g_camids, "g_camids", ng)
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    max_rank = min(max_rank, ng)
    q_code, g_code = _shared_codes(q_pid, g_pid)

    rows, cols, gidx = _ranked_matches(dist, q_code, g_code, _sort_device(device))
    if filter_same_camera:
        removed = g_cam[gidx] == q_cam[rows]
    else:
        removed = np.zeros(len(rows), dtype=bool)
    result = _metrics_from_matches(rows, cols, removed, nq, max_rank)
    log.debug(
        "evaluated %d x %d (filter_same_camera=%s): %d valid queries",
        nq,
        ng,
        filter_same_camera,
        result.num_valid_queries,
    )
    return result


def distance_matrix(
    q_feats: np.ndarray | torch.Tensor,
    g_feats: np.ndarray | torch.Tensor,
    similarity: str,
) -> np.ndarray:
    """``-q @ g.T`` in float64, the distance MITML and VLD rank with.

    Args:
        q_feats: ``[nq, D]`` query features.
        g_feats: ``[ng, D]`` gallery features.
        similarity: ``"inner_product"`` (raw dot product, VLD's unnormalised features) or
            ``"cosine"`` (rows L2-normalised first, as MITML does), see ``ReIDModel.similarity``.

    Returns:
        float64 ``[nq, ng]``, smaller = more similar.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    q = _as_feats(q_feats, "q_feats")
    g = _as_feats(g_feats, "g_feats")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"q_feats and g_feats differ in width: {q.shape[1]} vs {g.shape[1]}")
    if similarity == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return -(q @ g.T)


# ---------------------------------------------------------------------------------------------
# input checks


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_distmat(distmat: Any) -> np.ndarray:
    dist = _to_numpy(distmat)
    if dist.ndim != 2:
        raise ValueError(f"distmat must be 2-D [num_queries, num_gallery], got shape {dist.shape}")
    if dist.shape[0] == 0 or dist.shape[1] == 0:
        raise ValueError(f"distmat is empty (shape {dist.shape}): no queries or no gallery")
    if not (np.issubdtype(dist.dtype, np.floating) or np.issubdtype(dist.dtype, np.integer)):
        raise ValueError(f"distmat must hold real numbers, got dtype {dist.dtype}")
    if np.issubdtype(dist.dtype, np.floating):
        nan_rows = np.flatnonzero(np.isnan(dist).any(axis=1))
        if len(nan_rows):
            raise ValueError(
                f"distmat has NaN distances in {len(nan_rows)} query rows "
                f"(first: row {int(nan_rows[0])}); NaN cannot be ranked"
            )
    return dist


def _as_labels(values: Any, name: str, expected: int) -> np.ndarray:
    arr = _to_numpy(values)
    if arr.ndim != 1 or len(arr) != expected:
        raise ValueError(
            f"{name} must be 1-D with {expected} entries (matching distmat), got shape {arr.shape}"
        )
    return arr


def _as_feats(feats: Any, name: str) -> np.ndarray:
    arr = _to_numpy(feats).astype(np.float64, copy=False)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {arr.shape}")
    return arr


def _shared_codes(q_pid: np.ndarray, g_pid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map pids of both sides to small integers, so any label type can be compared on any device."""
    _, codes = np.unique(np.concatenate([q_pid, g_pid]), return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    return codes[: len(q_pid)], codes[len(q_pid) :]


def _sort_device(device: str | torch.device) -> torch.device | None:
    """None means the numpy path; a torch device means sorting there."""
    resolved = resolve_device(device)
    return None if resolved.type == "cpu" else resolved


# ---------------------------------------------------------------------------------------------
# ranking: the only O(nq * ng) work


def _ranked_matches(
    dist: np.ndarray, q_code: np.ndarray, g_code: np.ndarray, device: torch.device | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of same-pid gallery items in each query's ranked list.

    Returns:
        ``(rows, cols, gidx)``, sorted by row then column: query ``rows[k]`` has gallery item
        ``gidx[k]``, a same-pid item, at 0-based rank ``cols[k]`` of its unfiltered ranking.
    """
    nq, ng = dist.shape
    block = max(1, _BLOCK_ELEMENTS // ng)
    starts = range(0, nq, block)

    def run(start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        stop = min(start + block, nq)
        if device is None:
            rows, cols, gidx = _block_matches_numpy(dist[start:stop], q_code[start:stop], g_code)
        else:
            rows, cols, gidx = _block_matches_torch(
                dist[start:stop], q_code[start:stop], g_code, device
            )
        return rows + start, cols, gidx

    workers = min(_MAX_WORKERS, os.cpu_count() or 1, len(starts))
    if device is None and workers > 1:
        # numpy releases the GIL while sorting, so blocks sort in parallel on several cores
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(run, starts))
    else:
        parts = [run(start) for start in starts]
    rows, cols, gidx = (np.concatenate(p) for p in zip(*parts, strict=True))
    order = np.lexsort((cols, rows))
    return rows[order], cols[order], gidx[order]


def _block_matches_numpy(
    dist: np.ndarray, q_code: np.ndarray, g_code: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(dist, axis=1)
    rows, cols = np.nonzero(g_code[order] == q_code[:, None])
    return rows.astype(np.int64), cols.astype(np.int64), order[rows, cols]


def _block_matches_torch(
    dist: np.ndarray, q_code: np.ndarray, g_code: np.ndarray, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort on ``device``; rows with tied distances are redone with numpy's own argsort."""
    dist_t = torch.from_numpy(np.ascontiguousarray(dist)).to(device)
    values, order = torch.sort(dist_t, dim=1)
    tied = (values[:, 1:] == values[:, :-1]).any(dim=1)
    is_match = (
        torch.from_numpy(g_code).to(device)[order] == torch.from_numpy(q_code).to(device)[:, None]
    )
    is_match[tied] = False
    rows_t, cols_t = torch.nonzero(is_match, as_tuple=True)
    rows, cols = rows_t.cpu().numpy(), cols_t.cpu().numpy()
    gidx = order[rows_t, cols_t].cpu().numpy()
    tied_rows = np.flatnonzero(tied.cpu().numpy())
    if len(tied_rows) == 0:
        return rows, cols, gidx
    t_rows, t_cols, t_gidx = _block_matches_numpy(dist[tied_rows], q_code[tied_rows], g_code)
    return (
        np.concatenate([rows, tied_rows[t_rows]]),
        np.concatenate([cols, t_cols]),
        np.concatenate([gidx, t_gidx]),
    )


# ---------------------------------------------------------------------------------------------
# metrics on the sparse list of positives


def _within_row_count_before(flags: np.ndarray, first_of_row: np.ndarray) -> np.ndarray:
    """For each entry, how many entries earlier in its row (rows are contiguous) are flagged."""
    before = np.cumsum(flags) - flags
    return before - before[first_of_row]


def _metrics_from_matches(
    rows: np.ndarray, cols: np.ndarray, removed: np.ndarray, nq: int, max_rank: int
) -> EvalResult:
    """Apply the gallery filter, renumber ranks, and reduce to CMC / mAP / mINP."""
    first_of_row = np.searchsorted(rows, rows, side="left")
    removed_before = _within_row_count_before(removed.astype(np.int64), first_of_row)
    kept = ~removed
    hits_before = _within_row_count_before(kept.astype(np.int64), first_of_row)

    hit_row = rows[kept]
    hit_rank = (cols - removed_before)[kept] + 1  # 1-based rank in the filtered list
    hit_number = hits_before[kept] + 1  # this is the j-th positive of its query

    num_pos = np.bincount(hit_row, minlength=nq)
    valid = num_pos > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(
            "no query has a positive in the gallery (after the same-camera filter): "
            "check that query and gallery pids overlap"
        )

    ap_sum = np.bincount(hit_row, weights=hit_number / hit_rank, minlength=nq)
    ap = ap_sum[valid] / num_pos[valid]

    first_rank = np.zeros(nq, dtype=np.int64)
    is_first = hit_number == 1
    first_rank[hit_row[is_first]] = hit_rank[is_first]
    last_rank = np.zeros(nq, dtype=np.int64)
    is_last = hit_number == num_pos[hit_row]
    last_rank[hit_row[is_last]] = hit_rank[is_last]
    inp = num_pos[valid] / last_rank[valid]

    first_hits = np.bincount(np.minimum(first_rank[valid], max_rank + 1), minlength=max_rank + 2)
    cmc_counts = np.cumsum(first_hits[1 : max_rank + 1]).astype(np.float32)
    cmc = cmc_counts / float(num_valid)  # float32 / python float stays float32, as official
    return EvalResult(
        cmc=cmc, mAP=float(np.mean(ap)), mINP=float(np.mean(inp)), num_valid_queries=num_valid
    )
