"""CMC / mAP / mINP: hand-computed cases and equality with a per-query reference loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vvireid.training.evaluation import (
    EvalResult,
    _block_matches_numpy,
    _block_matches_torch,
    distance_matrix,
    evaluate,
)


def reference_evaluate(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    filter_same_camera: bool,
    max_rank: int = 20,
) -> tuple[np.ndarray, float, float, int]:
    """Straight transcription of the official per-query loop (MITML ``evaluate``; one query at a time)."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    order = np.argsort(distmat, axis=1)
    curves, aps, inps = [], [], []
    for i in range(num_q):
        ranked = order[i]
        match = g_pids[ranked] == q_pids[i]
        if filter_same_camera:
            keep = ~(match & (g_camids[ranked] == q_camids[i]))
        else:
            keep = np.ones(num_g, dtype=bool)
        m = match[keep].astype(np.int64)
        if not m.any():
            continue
        c = m.cumsum()
        c[c > 1] = 1
        curve = c[:max_rank]
        if len(curve) < max_rank:  # filtered list shorter than max_rank: the hit stays a hit
            curve = np.concatenate([curve, np.full(max_rank - len(curve), curve[-1])])
        curves.append(curve)
        positions = np.flatnonzero(m) + 1
        num_rel = len(positions)
        aps.append(sum((j + 1) / p for j, p in enumerate(positions)) / num_rel)
        inps.append(num_rel / positions[-1])
    all_cmc = np.asarray(curves).astype(np.float32)
    cmc = all_cmc.sum(0) / float(len(curves))
    return cmc, float(np.mean(aps)), float(np.mean(inps)), len(curves)


def random_problem(rng: np.random.Generator, nq: int, ng: int, n_ids: int, n_cams: int) -> tuple:
    """Random distances (no ties) plus queries with no positive and camera-only positives."""
    distmat = rng.random((nq, ng))
    q_pids = rng.integers(0, n_ids, nq)
    g_pids = rng.integers(0, n_ids, ng)
    q_camids = rng.integers(0, n_cams, nq)
    g_camids = rng.integers(0, n_cams, ng)
    q_pids[0] = n_ids + 5  # no positive in the gallery at all
    lone = n_ids + 6  # positives only in the query's own camera
    q_pids[1], q_camids[1] = lone, 0
    g_pids[:3], g_camids[:3] = lone, 0
    return distmat, q_pids, g_pids, q_camids, g_camids


def assert_matches_reference(result: EvalResult, reference: tuple) -> None:
    cmc, m_ap, m_inp, num_valid = reference
    assert result.num_valid_queries == num_valid
    assert result.cmc.dtype == np.float32
    np.testing.assert_array_equal(result.cmc, cmc)
    assert abs(result.mAP - m_ap) < 1e-12
    assert abs(result.mINP - m_inp) < 1e-12


# ---- hand-computed toy case ------------------------------------------------------------------
# 3 queries x 4 gallery items. Gallery pids [1, 2, 1, 3], cameras [0, 1, 1, 0].
TOY_D = np.array(
    [
        [0.1, 0.2, 0.3, 0.4],  # q0 pid 1 cam 0: ranking g0 g1 g2 g3, hits g0 and g2
        [0.4, 0.3, 0.2, 0.1],  # q1 pid 2 cam 1: ranking g3 g2 g1 g0, hit g1 (same camera)
        [0.5, 0.6, 0.7, 0.8],  # q2 pid 9: no positive anywhere
    ]
)
TOY = (
    TOY_D,
    np.array([1, 2, 9]),
    np.array([1, 2, 1, 3]),
    np.array([0, 1, 0]),
    np.array([0, 1, 1, 0]),
)


def test_toy_without_camera_filter() -> None:
    # q0: hits at ranks 1 and 3 -> AP = (1/1 + 2/3) / 2 = 5/6, INP = 2/3
    # q1: hit at rank 3 -> AP = 1/3, INP = 1/3; q2 skipped (no positive)
    result = evaluate(*TOY, filter_same_camera=False, max_rank=4)
    assert result.num_valid_queries == 2
    np.testing.assert_allclose(result.cmc, [0.5, 0.5, 1.0, 1.0])
    assert result.mAP == pytest.approx((5 / 6 + 1 / 3) / 2)
    assert result.mINP == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_toy_with_camera_filter() -> None:
    # q0 loses g0 (pid 1, cam 0): list g1 g2 g3, hit g2 now at rank 2 -> AP 1/2, INP 1/2.
    # q1 loses g1 (its only positive, same camera) -> skipped, like q2.
    result = evaluate(*TOY, filter_same_camera=True, max_rank=4)
    assert result.num_valid_queries == 1
    np.testing.assert_allclose(result.cmc, [0.0, 1.0, 1.0, 1.0])
    assert result.mAP == pytest.approx(0.5)
    assert result.mINP == pytest.approx(0.5)


def test_to_dict_reports_ranks_within_max_rank_and_shrinks_to_gallery() -> None:
    result = evaluate(*TOY, filter_same_camera=False)  # max_rank 20 > 4 gallery items
    assert len(result.cmc) == 4
    out = result.to_dict()
    assert set(out) == {"R1", "mAP", "mINP"}
    assert all(type(v) is float and 0.0 <= v <= 1.0 for v in out.values())
    assert out["R1"] == pytest.approx(0.5)


def test_cmc_is_read_only() -> None:
    result = evaluate(*TOY, filter_same_camera=False)
    with pytest.raises(ValueError):
        result.cmc[0] = 1.0


# ---- equality with the reference loop --------------------------------------------------------
@pytest.mark.parametrize("filter_same_camera", [True, False])
@pytest.mark.parametrize(
    ("seed", "nq", "ng", "n_ids", "n_cams", "max_rank"),
    [(0, 60, 200, 20, 6, 20), (1, 40, 15, 5, 2, 20), (2, 120, 300, 80, 3, 50)],
)
def test_fast_equals_reference(
    filter_same_camera: bool, seed: int, nq: int, ng: int, n_ids: int, n_cams: int, max_rank: int
) -> None:
    rng = np.random.default_rng(seed)
    problem = random_problem(rng, nq, ng, n_ids, n_cams)
    result = evaluate(*problem, filter_same_camera=filter_same_camera, max_rank=max_rank)
    reference = reference_evaluate(*problem, filter_same_camera, max_rank)
    assert_matches_reference(result, reference)


def test_filtered_list_shorter_than_max_rank() -> None:
    # 3 gallery items, one removed by the camera filter: the CMC still has 3 entries
    problem = (
        np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]]),
        np.array([1, 1]),
        np.array([1, 2, 1]),
        np.array([0, 5]),
        np.array([0, 1, 1]),
    )
    result = evaluate(*problem, filter_same_camera=True)
    # q0: g0 removed, list g1 g2, hit at rank 2; q1: list g2 g1 g0, hits at ranks 1 and 3
    np.testing.assert_allclose(result.cmc, [0.5, 1.0, 1.0])
    assert result.mAP == pytest.approx((1 / 2 + (1 + 2 / 3) / 2) / 2)
    assert_matches_reference(result, reference_evaluate(*problem, True))


def test_fast_equals_reference_on_float32_with_ties() -> None:
    # Ties are ordered by numpy's default argsort in both, as in the official code.
    rng = np.random.default_rng(7)
    distmat, *labels = random_problem(rng, 50, 120, 15, 4)
    tied = (np.round(distmat * 10) / 10).astype(np.float32)
    for flag in (True, False):
        result = evaluate(tied, *labels, filter_same_camera=flag, device="cpu")
        assert_matches_reference(result, reference_evaluate(tied, *labels, flag))


def test_camera_filter_skips_queries_whose_positives_share_their_camera() -> None:
    rng = np.random.default_rng(3)
    problem = random_problem(rng, 30, 80, 10, 3)
    with_filter = evaluate(*problem, filter_same_camera=True)
    without = evaluate(*problem, filter_same_camera=False)
    # query 0 never counts; query 1 counts only without the filter
    assert without.num_valid_queries - with_filter.num_valid_queries >= 1
    assert without.num_valid_queries == 29


def test_torch_sort_path_equals_numpy_including_ties() -> None:
    rng = np.random.default_rng(11)
    distmat = rng.random((40, 90))
    distmat[::3] = np.round(distmat[::3] * 8) / 8  # every third row has ties
    q_code = rng.integers(0, 10, 40)
    g_code = rng.integers(0, 10, 90)
    expected = _block_matches_numpy(distmat, q_code, g_code)
    got = _block_matches_torch(distmat, q_code, g_code, torch.device("cpu"))
    order = np.lexsort((got[1], got[0]))
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e, g[order])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_gives_identical_results() -> None:
    rng = np.random.default_rng(5)
    problem = random_problem(rng, 300, 900, 60, 6)
    for flag in (True, False):
        cpu = evaluate(*problem, filter_same_camera=flag, device="cpu")
        gpu = evaluate(*problem, filter_same_camera=flag, device="cuda")
        np.testing.assert_array_equal(cpu.cmc, gpu.cmc)
        assert cpu.mAP == gpu.mAP and cpu.mINP == gpu.mINP


def test_accepts_torch_tensors_and_string_pids() -> None:
    distmat, q_pids, g_pids, q_camids, g_camids = TOY
    result = evaluate(
        torch.from_numpy(distmat),
        [f"p{p}" for p in q_pids],
        [f"p{p}" for p in g_pids],
        torch.from_numpy(q_camids),
        g_camids,
        filter_same_camera=False,
        max_rank=4,
    )
    assert result.mAP == pytest.approx((5 / 6 + 1 / 3) / 2)


# ---- errors ---------------------------------------------------------------------------------
def test_bad_inputs_are_named() -> None:
    distmat, q_pids, g_pids, q_camids, g_camids = TOY
    with pytest.raises(ValueError, match="g_pids"):
        evaluate(distmat, q_pids, g_pids[:3], q_camids, g_camids, filter_same_camera=True)
    with pytest.raises(ValueError, match="2-D"):
        evaluate(distmat[0], q_pids, g_pids, q_camids, g_camids, filter_same_camera=True)
    nan = distmat.copy()
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN.*row 1"):
        evaluate(nan, q_pids, g_pids, q_camids, g_camids, filter_same_camera=True)
    with pytest.raises(ValueError, match="no query has a positive"):
        evaluate(distmat, q_pids + 100, g_pids, q_camids, g_camids, filter_same_camera=False)
    with pytest.raises(ValueError, match="device"):
        evaluate(*TOY, filter_same_camera=False, device="gpu0")


# ---- distance_matrix -------------------------------------------------------------------------
def test_distance_matrix_forms() -> None:
    q = np.array([[3.0, 4.0], [1.0, 0.0]], dtype=np.float32)
    g = np.array([[0.0, 2.0], [2.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    dot = distance_matrix(q, g, "inner_product")
    assert dot.dtype == np.float64
    np.testing.assert_allclose(dot, [[-8.0, -6.0, -7.0], [0.0, -2.0, -1.0]])
    cos = distance_matrix(torch.from_numpy(q), torch.from_numpy(g), "cosine")
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(cos, [[-0.8, -0.6, -0.7 * 2 * s], [0.0, -1.0, -s]], atol=1e-12)
    with pytest.raises(ValueError, match="similarity"):
        distance_matrix(q, g, "euclidean")
    with pytest.raises(ValueError, match="width"):
        distance_matrix(q, g[:, :1], "cosine")
