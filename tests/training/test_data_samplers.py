"""Sampler invariants: P x K per modality, aligned pids, determinism, epochs, disjoint ranks."""

from collections import Counter

import pytest
from vvireid.indexer.sources.splits import DatasetSplits
from vvireid.model.types import Modality, Tracklet
from vvireid.training.data.samplers import (
    BUPTCameraPairSampler,
    CrossModalityIdentitySampler,
    TrainKey,
    build_sampler,
)


def vcm_like_splits() -> DatasetSplits:
    """12 ids with 1-4 tracklets per modality, plus id 99 seen only in visible."""
    train = []
    for pid in range(12):
        for modality in Modality:
            for k in range(1 + (pid + int(modality)) % 4):
                train.append(Tracklet(f"{pid}-{modality.label}-{k}", ("f",), modality, k % 3, pid))
    train.append(Tracklet("lonely", ("f",), Modality.VISIBLE, 0, 99))
    return DatasetSplits("t", train, {}, {}, 13, 3, "rrs_test", True)


def bupt_like_splits() -> DatasetSplits:
    """Aligned pairs: ids 0..9 over 2-4 cameras (1-2 pairs each), id 50 in one camera only."""
    train, pairs = [], []
    for pid in list(range(10)) + [50]:
        cams = [0] if pid == 50 else list(range(2 + pid % 3))
        for cam in cams:
            for k in range(1 + (pid + cam) % 2):
                pairs.append((len(train), len(train) + 1))
                train += [
                    Tracklet(f"{pid}-{cam}-{k}-v", ("f",), Modality.VISIBLE, cam, pid),
                    Tracklet(f"{pid}-{cam}-{k}-i", ("f",), Modality.INFRARED, cam, pid),
                ]
    return DatasetSplits("b", train, {}, {}, 11, 4, "uniform", False, train_pairs=pairs)


def test_cross_modality_batches_are_p_ids_by_k_aligned_tracklets():
    splits = vcm_like_splits()
    sampler = CrossModalityIdentitySampler.from_splits(splits, 4, 3, num_batches=20, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 20
    for batch in batches:
        assert len(batch) == 12 and all(isinstance(k, TrainKey) for k in batch)
        rgb, ir, _ = zip(*batch, strict=True)
        assert all(splits.train[r].modality == Modality.VISIBLE for r in rgb)
        assert all(splits.train[i].modality == Modality.INFRARED for i in ir)
        pids = [splits.train[r].pid for r in rgb]
        assert pids == [splits.train[i].pid for i in ir]
        assert list(Counter(pids).values()) == [3, 3, 3, 3]  # 4 distinct ids, K=3 each, id-major
        assert pids == sorted(pids, key=pids.index)
        assert 99 not in pids  # identities without both modalities are never drawn


def test_cross_modality_sampler_is_deterministic_and_changes_per_epoch():
    splits = vcm_like_splits()

    def run(seed, epoch):
        sampler = CrossModalityIdentitySampler.from_splits(splits, 4, 2, num_batches=5, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert run(0, 0) == run(0, 0)
    assert run(0, 0) != run(0, 1) and run(0, 0) != run(1, 0)
    resumed = CrossModalityIdentitySampler.from_splits(splits, 4, 2, num_batches=5, seed=99)
    resumed.load_state_dict({"seed": 0, "epoch": 1})
    assert list(resumed) == run(0, 1)


def test_ranks_get_disjoint_shares_whose_union_is_the_global_batch():
    splits = vcm_like_splits()
    ranks = [
        CrossModalityIdentitySampler.from_splits(splits, 4, 2, 6, seed=1, rank=r, world_size=2)
        for r in (0, 1)
    ]
    for sampler in ranks:
        sampler.set_epoch(4)
    whole = ranks[0].global_batches()
    for b, (share0, share1) in enumerate(zip(*ranks, strict=True)):
        assert len(share0) == len(share1) == 4
        assert share0 + share1 == whole[b]
        pids0 = {splits.train[k.rgb].pid for k in share0}
        assert pids0.isdisjoint({splits.train[k.rgb].pid for k in share1})
    with pytest.raises(ValueError, match="divisible"):
        CrossModalityIdentitySampler.from_splits(splits, 3, 2, 6, world_size=2)


def test_too_few_identities_is_a_clear_error():
    with pytest.raises(ValueError, match="only 12 identities"):
        CrossModalityIdentitySampler.from_splits(vcm_like_splits(), 13, 2, 1)


def test_bupt_batches_are_p_ids_by_two_distinct_cameras():
    splits = bupt_like_splits()
    sampler = BUPTCameraPairSampler.from_splits(splits, ids_per_batch=4, num_batches=30, seed=2)
    for batch in sampler:
        assert len(batch) == 8
        assert all((k.rgb, k.ir) in splits.train_pairs for k in batch)
        for a, b in zip(
            batch[::2], batch[1::2], strict=True
        ):  # id-major: the two pairs of one identity
            ta, tb = splits.train[a.rgb], splits.train[b.rgb]
            assert ta.pid == tb.pid and ta.camid != tb.camid
        pids = [splits.train[k.rgb].pid for k in batch[::2]]
        assert len(set(pids)) == 4 and 50 not in pids  # single-camera identity never appears


def test_bupt_pass_uses_pairs_without_replacement():
    splits = bupt_like_splits()
    sampler = BUPTCameraPairSampler.from_splits(splits, ids_per_batch=2, num_batches=1000, seed=0)
    first_pass = []
    for batch in sampler:  # the first pass ends when fewer than P identities hold chunks
        first_pass += [(k.rgb, k.ir) for k in batch]
        if len(first_pass) >= 8:
            break
    assert len(first_pass) == len(set(first_pass))


def test_bupt_sampler_determinism_and_ranks():
    splits = bupt_like_splits()
    a = BUPTCameraPairSampler.from_splits(splits, 4, 10, seed=5)
    b = BUPTCameraPairSampler.from_splits(splits, 4, 10, seed=5)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    shares = [
        BUPTCameraPairSampler.from_splits(splits, 4, 10, seed=5, rank=r, world_size=2)
        for r in (0, 1)
    ]
    for s0, s1, whole in zip(shares[0], shares[1], b.global_batches(), strict=True):
        assert s0 + s1 == whole and not {k.rgb for k in s0} & {k.rgb for k in s1}


def test_bupt_pass_continues_across_epochs_as_the_official_iterloader():
    """Epochs are consecutive slices of one endless sequence of passes, not a fresh pass each."""
    splits = bupt_like_splits()

    def epochs(num_batches, count):
        sampler = BUPTCameraPairSampler.from_splits(splits, 2, num_batches, seed=7)
        out = []
        for epoch in range(count):
            sampler.set_epoch(epoch)
            out += list(sampler)
        return out

    pass_length = BUPTCameraPairSampler.from_splits(splits, 2, 1, seed=7)._pass_length(0)
    assert pass_length > 3  # so an epoch of 3 batches ends inside the first pass
    assert epochs(3, 4) == epochs(12, 1)
    first_pass = [(k.rgb, k.ir) for batch in epochs(3, 4)[:pass_length] for k in batch]
    assert len(first_pass) == len(set(first_pass))  # no pair repeats across the epoch boundary
    resumed = BUPTCameraPairSampler.from_splits(splits, 2, 3, seed=0)
    resumed.load_state_dict({"seed": 7, "epoch": 2})
    assert list(resumed) == epochs(3, 4)[6:9]


def test_identity_sampler_is_the_default_draw_on_aligned_datasets():
    """X-ReID's official BUPT draw: visible and infrared tracklets of a person drawn independently,
    every identity eligible (also one seen by a single camera), frames not shared."""
    splits = bupt_like_splits()
    sampler = build_sampler("identity", splits, ids_per_batch=4, tracklets_per_id=2,
                            num_batches=200, seed=1)
    assert isinstance(sampler, CrossModalityIdentitySampler) and not sampler.aligned_frames
    keys = [k for batch in sampler for k in batch]
    assert 50 in {splits.train[k.rgb].pid for k in keys}
    twins = sum((k.rgb, k.ir) in splits.train_pairs for k in keys)
    assert 0 < twins < len(keys)  # independent draws: twins only by chance
    pairs = build_sampler("camera_pairs", splits, ids_per_batch=4, tracklets_per_id=2,
                          num_batches=5)
    assert isinstance(pairs, BUPTCameraPairSampler) and pairs.aligned_frames
    with pytest.raises(ValueError, match="tracklets_per_id must be 2"):
        build_sampler("camera_pairs", splits, ids_per_batch=4, tracklets_per_id=3, num_batches=5)
    with pytest.raises(ValueError, match="aligned RGB/IR twins"):
        build_sampler("camera_pairs", vcm_like_splits(), ids_per_batch=4, tracklets_per_id=2,
                      num_batches=5)
    with pytest.raises(ValueError, match="not one of identity, camera_pairs"):
        build_sampler("pairs", splits, ids_per_batch=4, tracklets_per_id=2, num_batches=5)
