"""Frame sampling rules: which frames of an n-frame tracklet make a T-frame clip.

Every rule returns a list of clips, each a list of T frame indices in temporal order. Test rules
are deterministic; train rules take a ``numpy.random.Generator``. The rules and their n < T cases
follow the official loaders (MITML, the BUPTCampus code, X-ReID; docs/fidelity.md D4, D10):

* ``rrs_test`` (alias ``video_test``): MITML / VLD on HITSZ-VCM, X-ReID training-time eval. Pad the
  list with its last index to ``ceil(n/T)*T`` and take the first index of each of the T chunks.
* ``uniform``: BUPTCampus, ``np.linspace(0, n, T, endpoint=False).astype(int)``.
* ``dense``: X-ReID ``eval_all``: consecutive clips of T frames; the remainder clip is padded by
  cycling its own frames. Features of the clips are averaged by the caller.
* ``rrs_train``: restricted random, one uniformly random index per chunk (VCM training).
* ``random_sorted``: BUPTCampus training, a sorted random subset (with replacement when n < T).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

TEST_RULES = ("rrs_test", "video_test", "uniform", "dense")
TRAIN_RULES = ("rrs_train", "random_sorted")


def _check(n: int, seq_len: int) -> None:
    if n < 1:
        raise ValueError(f"a tracklet needs at least one frame, got {n}")
    if seq_len < 1:
        raise ValueError(f"sequence length must be >= 1, got {seq_len}")


def _chunks(n: int, seq_len: int) -> list[list[int]]:
    """The T chunks of the padded index strip (only used when n >= T)."""
    size = math.ceil(n / seq_len)
    strip = list(range(n)) + [n - 1] * (size * seq_len - n)
    return [strip[size * s : size * (s + 1)] for s in range(seq_len)]


def rrs_test(n: int, seq_len: int) -> list[list[int]]:
    """First index of each chunk (``video_test`` / ``rrs_test``). n=24, T=10 -> 0 3 6 ... 21 23 23."""
    _check(n, seq_len)
    if n < seq_len:
        return [list(range(n)) + [n - 1] * (seq_len - n)]
    return [[chunk[0] for chunk in _chunks(n, seq_len)]]


def uniform(n: int, seq_len: int) -> list[list[int]]:
    """BUPTCampus test rule: ``floor(s*n/T)`` for s in 0..T-1 (indices repeat when n < T)."""
    _check(n, seq_len)
    return [np.linspace(0, n, seq_len, endpoint=False).astype(int).tolist()]


def dense(n: int, seq_len: int) -> list[list[int]]:
    """All frames as consecutive clips; a partial last clip cycles its own frames."""
    _check(n, seq_len)
    clips = [list(range(s, s + seq_len)) for s in range(0, n - n % seq_len, seq_len)]
    rest = list(range(n - n % seq_len, n))
    if rest:
        clips.append([rest[i % len(rest)] for i in range(seq_len)])
    return clips


def rrs_train(n: int, seq_len: int, rng: np.random.Generator) -> list[list[int]]:
    """Restricted random sampling: one uniformly random index per chunk (deterministic if n < T)."""
    _check(n, seq_len)
    if n < seq_len:
        return rrs_test(n, seq_len)
    return [[int(chunk[rng.integers(len(chunk))]) for chunk in _chunks(n, seq_len)]]


def random_sorted(n: int, seq_len: int, rng: np.random.Generator) -> list[list[int]]:
    """BUPTCampus training rule: a sorted random subset, with replacement only when n < T."""
    _check(n, seq_len)
    return [sorted(int(i) for i in rng.choice(n, seq_len, replace=n < seq_len))]


_TEST: dict[str, Callable[[int, int], list[list[int]]]] = {
    "rrs_test": rrs_test,
    "video_test": rrs_test,
    "uniform": uniform,
    "dense": dense,
}
_TRAIN: dict[str, Callable[[int, int, np.random.Generator], list[list[int]]]] = {
    "rrs_train": rrs_train,
    "random_sorted": random_sorted,
}


def sample_test(n: int, seq_len: int, rule: str) -> list[list[int]]:
    """Apply a named test-time rule. Raises ValueError listing the known rules."""
    if rule not in _TEST:
        raise ValueError(f"unknown test frame sampling {rule!r}; known: {', '.join(_TEST)}")
    return _TEST[rule](n, seq_len)


def sample_train(
    n: int, seq_len: int, rule: str, rng: np.random.Generator
) -> list[int]:
    """Apply a named train-time rule; returns one clip."""
    if rule not in _TRAIN:
        raise ValueError(f"unknown train frame sampling {rule!r}; known: {', '.join(_TRAIN)}")
    return _TRAIN[rule](n, seq_len, rng)[0]
