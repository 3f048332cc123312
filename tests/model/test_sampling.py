"""Frame-sampling rules of ``vvireid.model.sampling`` against the official loaders' index tables."""

import math

import numpy as np
import pytest
from vvireid.model.sampling import (
    dense,
    random_sorted,
    rrs_test,
    rrs_train,
    sample_test,
    sample_train,
    uniform,
)


@pytest.mark.parametrize(
    ("n", "t", "expected"),
    [
        (24, 10, [0, 3, 6, 9, 12, 15, 18, 21, 23, 23]),  # repeated last frame (VCM, X-ReID T=10)
        (24, 6, [0, 4, 8, 12, 16, 20]),  # MITML / VLD T=6
        (25, 6, [0, 5, 10, 15, 20, 24]),
        (12, 10, [0, 2, 4, 6, 8, 10, 11, 11, 11, 11]),
        (4, 6, [0, 1, 2, 3, 3, 3]),  # n < T: all frames then the last repeated
        (1, 6, [0] * 6),
    ],
)
def test_rrs_test_table(n, t, expected):
    assert rrs_test(n, t) == [expected]
    assert sample_test(n, t, "video_test") == [expected]


@pytest.mark.parametrize("t", [6, 10])
def test_rrs_test_matches_the_official_closed_form(t):
    for n in range(1, 200):
        k = math.ceil(n / t)
        closed = (
            list(range(n)) + [n - 1] * (t - n) if n < t else [min(k * s, n - 1) for s in range(t)]
        )
        assert rrs_test(n, t) == [closed], n


@pytest.mark.parametrize(
    ("n", "t", "expected"),
    [
        (24, 6, [0, 4, 8, 12, 16, 20]),
        (24, 10, [0, 2, 4, 7, 9, 12, 14, 16, 19, 21]),
        (3, 6, [0, 0, 1, 1, 2, 2]),  # n < T repeats indices
        (1, 10, [0] * 10),
    ],
)
def test_uniform_table(n, t, expected):
    assert uniform(n, t) == [expected]


@pytest.mark.parametrize("t", [6, 10])
def test_uniform_is_floor_of_s_n_over_t(t):
    for n in range(1, 600):
        assert uniform(n, t) == [[s * n // t for s in range(t)]], n


def test_dense_cycles_the_remainder_clip():
    assert dense(24, 10) == [
        list(range(10)),
        list(range(10, 20)),
        [20, 21, 22, 23, 20, 21, 22, 23, 20, 21],
    ]
    assert dense(20, 10) == [list(range(10)), list(range(10, 20))]
    assert dense(3, 10) == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 0]]


def test_rrs_train_takes_one_frame_per_chunk():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        (clip,) = rrs_train(24, 6, rng)
        assert [i // 4 for i in clip] == list(range(6))  # chunk s covers 4s..4s+3
        seen.update(clip)
    assert seen == set(range(24))  # every frame reachable
    (clip,) = rrs_train(24, 10, rng)
    assert clip[8:] == [23, 23]  # chunks of pure padding
    assert rrs_train(4, 6, rng) == [[0, 1, 2, 3, 3, 3]]


def test_random_sorted_distinct_unless_too_short():
    rng = np.random.default_rng(1)
    for n in (6, 7, 30):
        (clip,) = random_sorted(n, 6, rng)
        assert clip == sorted(clip) and len(set(clip)) == 6 and max(clip) < n
    (short,) = random_sorted(3, 6, rng)
    assert short == sorted(short) and set(short) <= {0, 1, 2}


def test_train_rules_are_deterministic_for_a_seed():
    a = [sample_train(30, 10, "rrs_train", np.random.default_rng(5)) for _ in range(2)]
    b = [sample_train(30, 10, "random_sorted", np.random.default_rng(5)) for _ in range(2)]
    assert a[0] == a[1] and b[0] == b[1]


def test_unknown_rules_and_bad_lengths_are_rejected():
    with pytest.raises(ValueError, match="known"):
        sample_test(10, 6, "middle")
    with pytest.raises(ValueError, match="known"):
        sample_train(10, 6, "rrs_test", np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least one frame"):
        rrs_test(0, 6)
