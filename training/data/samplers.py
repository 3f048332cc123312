"""Identity-balanced batch samplers for cross-modality training.

Each sampler is a ``batch_sampler`` for ``torch.utils.data.DataLoader``: it yields, per batch, a
list of :class:`TrainKey` ``(rgb, ir, draw)``: ``rgb``/``ir`` index ``DatasetSplits.train`` and
share a pid, ``draw`` seeds that item's frame sampling and augmentation (so an item drawn twice
in a batch is augmented differently, and results do not depend on worker scheduling).
``zip(*batch)`` gives the aligned visible and infrared index lists. Batches are id-major:
the K items of identity 1, then those of identity 2, ...

Every batch is a function of ``(seed, epoch, batch number)`` only, which makes the samplers
deterministic and resumable from ``state_dict()`` (seed and epoch). With ``world_size > 1`` every
rank draws the same global batch and keeps the identities of its share (``ids_per_batch`` must
be divisible by ``world_size``), so the union over ranks is the global batch and shares are
disjoint.

Two kinds (``data.sampler``, built by :func:`build_sampler`, which checks the kind against the
dataset so the trainer never asks which dataset it has):

* ``identity`` (:class:`CrossModalityIdentitySampler`): the official ``IdentitySampler`` of VLD
  and X-ReID on HITSZ-VCM, and X-ReID's draw on BUPTCampus too: a person's visible and infrared
  tracklets are drawn independently, and the clip dataset samples their frames independently.
  Index lists are regenerated each epoch (VLD does so; X-ReID builds one list and repeats it).
* ``camera_pairs`` (:class:`BUPTCameraPairSampler`): VLD's BUPTCampus ``RandomIdentitySampler``
  over pixel-aligned RGB/IR twins that share frame indices. Its pass over the chunks continues
  from one epoch to the next, as the official ``IterLoader`` does.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from vvireid.indexer.sources.splits import DatasetSplits
from vvireid.model.types import Modality

log = logging.getLogger(__name__)

_DRAW_MAX = 2**62


class TrainKey(NamedTuple):
    """One training item: a visible and an infrared tracklet of the same pid, and its seed."""

    rgb: int
    ir: int
    draw: int


class _EpochBatches:
    """Shared machinery: epochs, rank shares, state.

    ``aligned_frames`` tells the clip dataset whether an item's two tracklets are pixel-aligned
    twins that must share frame indices.
    """

    tag = 0
    aligned_frames = False

    def __init__(
        self, ids_per_batch: int, num_batches: int, seed: int, rank: int, world_size: int
    ) -> None:
        if ids_per_batch < 1 or num_batches < 1:
            raise ValueError(
                f"ids_per_batch and num_batches must be >= 1, got {ids_per_batch}, {num_batches}"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if ids_per_batch % world_size:
            raise ValueError(
                f"ids_per_batch ({ids_per_batch}) must be divisible by world_size ({world_size})"
            )
        self.ids_per_batch, self.num_batches = ids_per_batch, num_batches
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches ``__iter__`` yields (call before each epoch)."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[TrainKey]]:
        rng = np.random.default_rng([self.seed, self.tag, self.epoch])
        per_rank = self.ids_per_batch // self.world_size
        for batch in self._global_batches(rng):
            share = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
            yield [key for group in share for key in group]

    def global_batches(self) -> list[list[TrainKey]]:
        """All ranks' items of every batch of the current epoch (for inspection and tests)."""
        rng = np.random.default_rng([self.seed, self.tag, self.epoch])
        return [[key for group in batch for key in group] for batch in self._global_batches(rng)]

    def _global_batches(self, rng: np.random.Generator) -> Iterator[list[list[TrainKey]]]:
        raise NotImplementedError


def _positions(pids: Sequence[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for position, pid in enumerate(pids):
        out[int(pid)].append(position)
    return out


class CrossModalityIdentitySampler(_EpochBatches):
    """P identities x K visible and K infrared tracklets per batch (VCM; VLD 4x4, X-ReID 4x2).

    Identities are drawn without replacement within a batch, tracklets with replacement, as in
    the official ``IdentitySampler``; item k pairs visible ``rgb[k]`` with infrared ``ir[k]``.
    Only identities present in both modalities are sampled.

    Args:
        rgb_pids, ir_pids: pid of each visible / infrared training tracklet.
        ids_per_batch: P. tracklets_per_id: K per modality. num_batches: batches per epoch.
        seed: base seed. rank, world_size: distributed share.
        rgb_index, ir_index: dataset index of each position of ``rgb_pids`` / ``ir_pids``
            (default: the positions themselves).
    """

    tag = 1

    def __init__(
        self,
        rgb_pids: Sequence[int],
        ir_pids: Sequence[int],
        ids_per_batch: int,
        tracklets_per_id: int,
        num_batches: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        *,
        rgb_index: Sequence[int] | None = None,
        ir_index: Sequence[int] | None = None,
    ) -> None:
        super().__init__(ids_per_batch, num_batches, seed, rank, world_size)
        if tracklets_per_id < 1:
            raise ValueError(f"tracklets_per_id must be >= 1, got {tracklets_per_id}")
        self.tracklets_per_id = tracklets_per_id
        self._rgb, self._ir = _positions(rgb_pids), _positions(ir_pids)
        self._rgb_index = list(range(len(rgb_pids))) if rgb_index is None else list(rgb_index)
        self._ir_index = list(range(len(ir_pids))) if ir_index is None else list(ir_index)
        self.pids = sorted(set(self._rgb) & set(self._ir))
        single = len(set(self._rgb) ^ set(self._ir))
        if single:
            log.warning("%d identities appear in one modality only and are never sampled", single)
        if len(self.pids) < ids_per_batch:
            raise ValueError(
                f"only {len(self.pids)} identities have both modalities; "
                f"a batch needs {ids_per_batch}"
            )

    @classmethod
    def from_splits(
        cls,
        splits: DatasetSplits,
        ids_per_batch: int,
        tracklets_per_id: int,
        num_batches: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> CrossModalityIdentitySampler:
        """Sampler over ``splits.train`` (keys index ``splits.train``)."""
        rgb = splits.train_indices(Modality.VISIBLE)
        ir = splits.train_indices(Modality.INFRARED)
        return cls(
            [splits.train[i].pid for i in rgb],
            [splits.train[i].pid for i in ir],
            ids_per_batch,
            tracklets_per_id,
            num_batches,
            seed,
            rank,
            world_size,
            rgb_index=rgb,
            ir_index=ir,
        )

    def _global_batches(self, rng: np.random.Generator) -> Iterator[list[list[TrainKey]]]:
        k = self.tracklets_per_id
        for _ in range(self.num_batches):
            batch = []
            for pid in rng.choice(self.pids, self.ids_per_batch, replace=False):
                rgb = rng.choice(self._rgb[int(pid)], k)
                ir = rng.choice(self._ir[int(pid)], k)
                draws = rng.integers(0, _DRAW_MAX, k)
                batch.append(
                    [
                        TrainKey(self._rgb_index[r], self._ir_index[i], int(d))
                        for r, i, d in zip(rgb, ir, draws, strict=True)
                    ]
                )
            yield batch


class BUPTCameraPairSampler(_EpochBatches):
    """P identities x 2 cameras x 1 aligned RGB/IR pair per batch (BUPTCampus, VLD 8x2x1).

    One pass, as the official ``RandomIdentitySampler``: per identity, repeatedly pick 2 distinct
    cameras that still hold unused pairs and take one pair of each (without replacement), giving
    that identity's chunks; then, while at least P identities hold chunks, pick P of them at random
    and take the first chunk of each. Identities recorded by a single camera never appear.

    Passes follow each other without regard to epochs, as the official ``IterLoader`` re-samples
    only when a pass is exhausted: epoch ``e`` yields global batches ``e * num_batches`` onwards of
    the endless sequence pass 0, pass 1, ... Pass ``k`` is a function of ``(seed, k)`` alone, so an
    epoch is still reproducible (and resumable) from ``(seed, epoch)``; pass lengths are cached.

    Args:
        pair_pids, pair_camids: pid and camid of each aligned pair.
        pairs: ``(rgb_index, ir_index)`` into the dataset of each pair
            (``DatasetSplits.train_pairs``).
        ids_per_batch: P. num_batches, seed, rank, world_size: as for the other sampler.
    """

    tag = 2
    aligned_frames = True

    def __init__(
        self,
        pair_pids: Sequence[int],
        pair_camids: Sequence[int],
        pairs: Sequence[tuple[int, int]],
        ids_per_batch: int = 8,
        num_batches: int = 200,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(ids_per_batch, num_batches, seed, rank, world_size)
        if not len(pair_pids) == len(pair_camids) == len(pairs):
            raise ValueError("pair_pids, pair_camids and pairs must have the same length")
        self.pairs = [tuple(p) for p in pairs]
        self._by_pid: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for position, (pid, camid) in enumerate(zip(pair_pids, pair_camids, strict=True)):
            self._by_pid[int(pid)][int(camid)].append(position)
        self.pids = sorted(pid for pid, cams in self._by_pid.items() if len(cams) >= 2)
        if len(self.pids) < ids_per_batch:
            raise ValueError(
                f"only {len(self.pids)} identities are seen by 2+ cameras; "
                f"a batch needs {ids_per_batch}"
            )
        single = len(self._by_pid) - len(self.pids)
        if single:
            log.warning("%d identities are seen by one camera only and are never sampled", single)
        self._pass_lengths: dict[int, list[int]] = {}  # seed -> batches in pass 0, 1, ...

    @classmethod
    def from_splits(
        cls,
        splits: DatasetSplits,
        ids_per_batch: int = 8,
        num_batches: int = 200,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> BUPTCameraPairSampler:
        """Sampler over ``splits.train_pairs`` (keys index ``splits.train``)."""
        if splits.train_pairs is None:
            raise ValueError(f"dataset {splits.name!r} has no aligned train pairs")
        pids = [splits.train[r].pid for r, _ in splits.train_pairs]
        cams = [splits.train[r].camid for r, _ in splits.train_pairs]
        return cls(
            pids, cams, splits.train_pairs, ids_per_batch, num_batches, seed, rank, world_size
        )

    def _chunks(self, rng: np.random.Generator) -> dict[int, list[tuple[int, int]]]:
        chunks: dict[int, list[tuple[int, int]]] = {}
        for pid in self.pids:
            pools = {
                cam: list(rng.permutation(pos)) for cam, pos in sorted(self._by_pid[pid].items())
            }
            out = []
            while sum(1 for p in pools.values() if p) >= 2:
                cams = rng.choice(sorted(c for c, p in pools.items() if p), 2, replace=False)
                out.append((int(pools[int(cams[0])].pop()), int(pools[int(cams[1])].pop())))
            chunks[pid] = out
        return chunks

    def _key(self, position: int, rng: np.random.Generator) -> TrainKey:
        rgb, ir = self.pairs[position]
        return TrainKey(int(rgb), int(ir), int(rng.integers(0, _DRAW_MAX)))

    def _pass(self, number: int) -> Iterator[list[list[TrainKey]]]:
        """The batches of pass ``number`` (at least one: every sampled pid holds a chunk)."""
        rng = np.random.default_rng([self.seed, self.tag, number])
        chunks = self._chunks(rng)
        while True:
            ready = [pid for pid in self.pids if chunks[pid]]
            if len(ready) < self.ids_per_batch:
                return
            chosen = rng.choice(ready, self.ids_per_batch, replace=False)
            yield [[self._key(p, rng) for p in chunks[int(pid)].pop(0)] for pid in chosen]

    def _pass_length(self, number: int) -> int:
        lengths = self._pass_lengths.setdefault(self.seed, [])
        while len(lengths) <= number:
            lengths.append(sum(1 for _ in self._pass(len(lengths))))
        return lengths[number]

    def _global_batches(self, rng: np.random.Generator) -> Iterator[list[list[TrainKey]]]:
        """This epoch's slice of the endless pass sequence (``rng`` is unused: passes own theirs)."""
        number, skip = 0, self.epoch * self.num_batches
        while skip >= self._pass_length(number):
            skip -= self._pass_length(number)
            number += 1
        made = 0
        while True:
            for position, batch in enumerate(self._pass(number)):
                if position < skip:
                    continue
                yield batch
                made += 1
                if made == self.num_batches:
                    return
            number, skip = number + 1, 0


SAMPLERS = ("identity", "camera_pairs")


def build_sampler(
    kind: str,
    splits: DatasetSplits,
    *,
    ids_per_batch: int,
    tracklets_per_id: int,
    num_batches: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> CrossModalityIdentitySampler | BUPTCameraPairSampler:
    """The ``kind`` sampler over ``splits.train``, checked against what the dataset offers.

    ``identity`` works on every dataset; ``camera_pairs`` needs aligned twins
    (``splits.train_pairs``, BUPTCampus) and counts cameras in ``tracklets_per_id`` (must be 2).
    The trainer asks this factory for its sampler, so dataset knowledge stays here and in the
    reader.

    Raises:
        ValueError: an unknown kind, a kind the dataset cannot serve, or too few identities.
    """
    if kind == "identity":
        return CrossModalityIdentitySampler.from_splits(
            splits, ids_per_batch, tracklets_per_id, num_batches, seed, rank, world_size
        )
    if kind == "camera_pairs":
        if splits.train_pairs is None:
            raise ValueError(
                f"data.sampler camera_pairs needs aligned RGB/IR twins, which dataset "
                f"{splits.name!r} does not have; use data.sampler=identity"
            )
        if tracklets_per_id != 2:
            raise ValueError(
                f"data.tracklets_per_id must be 2 for data.sampler camera_pairs (one aligned pair "
                f"from each of 2 cameras per identity), got {tracklets_per_id}"
            )
        return BUPTCameraPairSampler.from_splits(
            splits, ids_per_batch, num_batches, seed, rank, world_size
        )
    raise ValueError(f"data.sampler: {kind!r} is not one of {', '.join(SAMPLERS)}")
