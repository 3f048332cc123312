"""Exact torch search (the GPU path without FAISS-GPU) equals FAISS's flat search, filters included.

The production device is CUDA; the same code runs on the CPU here, which is what these tests use.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from test_store import DIM, items_for, new_index
from vvireid.indexer.backend import IndexParams, Selection, VectorIndex
from vvireid.indexer.torch_search import TorchExactSearch

CPU = torch.device("cpu")


def _unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(queries, vectors, ids, k, keep=None):
    scores = queries @ vectors.T
    if keep is not None:
        scores[:, ~keep] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def test_torch_search_matches_brute_force_through_adds_removes_and_masks():
    search = TorchExactSearch(CPU)
    vectors, ids = _unit(50, 0), np.arange(100, 150, dtype=np.int64)
    search.add(ids[:30], vectors[:30])
    search.add(ids[30:], vectors[30:])
    search.remove(np.array([105, 140, 999]))
    alive = ~np.isin(ids, [105, 140])
    queries = _unit(4, 1)
    keep = (ids[alive] % 2) == 0
    got_scores, got_ids = search.search(queries, 5, keep)
    want_scores, want_ids = _brute(queries, vectors[alive], ids[alive], 5, keep)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-6)


def test_fewer_candidates_than_k_pad_with_minus_one():
    search = TorchExactSearch(CPU)
    search.add(np.array([1, 2, 3]), _unit(3, 2))
    scores, ids = search.search(_unit(2, 3), 5, np.array([True, False, True]))
    assert (ids[:, :2] >= 0).all() and (ids[:, 2:] == -1).all()
    assert np.isneginf(scores[:, 2:]).all()


def test_vector_index_without_faiss_gpu_searches_with_torch_and_stays_in_step():
    if VectorIndex("flat", DIM, IndexParams()).enable_gpu(None) == "faiss-gpu":
        pytest.skip("FAISS has a GPU here; the torch path is the fallback")
    plain, torch_backed = (VectorIndex("flat", DIM, IndexParams()) for _ in range(2))
    assert torch_backed.enable_gpu(CPU) == "torch-cpu"
    vectors = _unit(80, 4)
    for index in (plain, torch_backed):
        index.add(np.arange(60), vectors[:60])
    queries = _unit(3, 5)
    torch_backed.search(queries, 5)  # builds the torch copy
    for index in (plain, torch_backed):  # later writes go to the copy incrementally
        index.add(np.arange(60, 80), vectors[60:])
        index.remove(np.array([3, 61]))
    selection = Selection(np.arange(0, 80, 3), id_bound=80)
    for sel in (None, selection):
        want = plain.search(queries, 7, sel)
        got = torch_backed.search(queries, 7, sel)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], atol=1e-5)


def test_a_cuda_gallery_never_refuses_to_open_for_lack_of_faiss_gpu(tmp_path, caplog):
    index = new_index(tmp_path / "g")
    index.add(items_for(10), _unit(10, 6))
    index.close()
    with caplog.at_level(logging.INFO):
        reopened = type(index).open(tmp_path / "g", device="cuda")
    with reopened:
        expected = "torch-cuda" if torch.cuda.is_available() else "cpu"
        assert reopened.search_device in (expected, "faiss-gpu")
        assert reopened.stats()["search_device"] == reopened.search_device
        assert len(reopened.search(_unit(1, 7), 3)[0]) == 3
    assert "searches run on" in caplog.text
