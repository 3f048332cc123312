"""Clip datasets: frame sampling per dataset rule, aligned pairs, bad-frame policy, test clips."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from vvireid.indexer.sources.splits import DatasetSplits
from vvireid.model.config import ModelConfig
from vvireid.model.preprocess import FrameError, FramePreprocessor
from vvireid.model.types import Modality, Tracklet
from vvireid.training.data.samplers import CrossModalityIdentitySampler, TrainKey
from vvireid.training.data.transforms import build_train_transform
from vvireid.training.data.video_dataset import TestClipDataset, TrainClipDataset, collate_test


def write_tracklet(folder, tid, modality, camid, pid, n):
    """Frame i is a flat image of value 5*i, so a decoded frame tells its own index."""
    paths = []
    for i in range(n):
        path = folder / f"{tid}_{i}.png"
        Image.new("RGB", (8, 16), (5 * i, 5 * i, 5 * i)).save(path)
        paths.append(str(path))
    return Tracklet(tid, tuple(paths), modality, camid, pid)


def probe(frames, modality, rng):
    """A transform that returns the index encoded in each frame: [T]."""
    return torch.tensor([np.asarray(f)[0, 0, 0] // 5 for f in frames])


@pytest.fixture()
def tracklets(tmp_path):
    return [
        write_tracklet(tmp_path, "v0", Modality.VISIBLE, 0, 0, 24),
        write_tracklet(tmp_path, "i0", Modality.INFRARED, 1, 0, 20),
        write_tracklet(tmp_path, "v1", Modality.VISIBLE, 2, 1, 12),
        write_tracklet(tmp_path, "i1", Modality.INFRARED, 3, 1, 30),
    ]


def test_rrs_train_samples_each_modality_independently(tracklets):
    data = TrainClipDataset(tracklets, probe, seq_len=6, sampling="rrs_train", seed=0)
    item = data[TrainKey(0, 1, 123)]
    assert [i // 4 for i in item["rgb"].tolist()] == list(range(6))  # n=24: chunks of 4
    assert [i // 4 for i in item["ir"].tolist()] == list(range(5)) + [4]  # n=20 padded to 24
    assert (item["pid"], item["rgb_camid"], item["ir_camid"]) == (0, 0, 1)
    assert torch.equal(data[TrainKey(0, 1, 123)]["rgb"], item["rgb"])  # same draw, same clip
    assert any(not torch.equal(data[TrainKey(0, 1, d)]["rgb"], item["rgb"]) for d in range(5))


def test_aligned_pairs_share_sorted_indices(tracklets):
    data = TrainClipDataset(
        tracklets, probe, seq_len=6, sampling="random_sorted", aligned_pairs=True
    )
    for draw in range(10):
        item = data[TrainKey(0, 1, draw)]
        assert torch.equal(item["rgb"], item["ir"])
        assert item["rgb"].tolist() == sorted(item["rgb"].tolist()) and max(item["rgb"]) < 20


def test_mismatched_keys_are_rejected(tracklets):
    data = TrainClipDataset(tracklets, probe, seq_len=4)
    with pytest.raises(ValueError, match="pids differ"):
        data[TrainKey(0, 3, 0)]
    with pytest.raises(ValueError, match="visible, infrared"):
        data[TrainKey(1, 0, 0)]


def test_loader_with_sampler_and_real_transform(tracklets):
    splits = DatasetSplits("t", tracklets, {}, {}, 2, 4, "rrs_test", True)
    sampler = CrossModalityIdentitySampler.from_splits(splits, 2, 2, num_batches=2, seed=0)
    data = TrainClipDataset(tracklets, build_train_transform("vld", (32, 16)), seq_len=4)
    batches = list(DataLoader(data, batch_sampler=sampler))
    assert len(batches) == 2
    batch = batches[0]
    assert batch["rgb"].shape == batch["ir"].shape == (4, 4, 3, 32, 16)
    assert batch["pid"].tolist() == [batch["pid"][0]] * 2 + [batch["pid"][2]] * 2


def test_bad_frame_fail_names_the_file(tracklets):
    broken = tracklets[0].frames[4]
    Path(broken).write_bytes(b"not an image")
    data = TrainClipDataset(tracklets, probe, seq_len=24, sampling="rrs_train")
    with pytest.raises(FrameError, match=broken):
        data[TrainKey(0, 1, 0)]


def test_bad_frame_skip_substitutes_a_neighbour(tracklets, caplog):
    broken = tracklets[0].frames[4]
    Path(broken).write_bytes(b"not an image")
    data = TrainClipDataset(tracklets, probe, seq_len=24, sampling="rrs_train", on_bad_frame="skip")
    with caplog.at_level(logging.WARNING):
        clip = data[TrainKey(0, 1, 0)]["rgb"].tolist()
        data[TrainKey(0, 1, 1)]
    assert clip[:4] == [0, 1, 2, 3] and clip[4] in (3, 5) and clip[5:] == list(range(5, 24))
    assert data.bad_frames == 1  # remembered, counted and logged once
    assert sum(broken in r.getMessage() for r in caplog.records) == 1


def test_bad_frame_skip_raises_when_nothing_is_readable(tmp_path):
    paths = []
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(b"")
        paths.append(str(tmp_path / f"{i}.jpg"))
    dead = Tracklet("dead", tuple(paths), Modality.VISIBLE, 0, 0)
    ok = write_tracklet(tmp_path, "ok", Modality.INFRARED, 0, 0, 3)
    data = TrainClipDataset([dead, ok], probe, seq_len=3, on_bad_frame="skip")
    with pytest.raises(FrameError, match="tracklet dead: no readable frame"):
        data[TrainKey(0, 1, 0)]


def test_test_clips_match_the_shared_preprocessor(tracklets):
    for rule, clips_per_tracklet in (("rrs_test", [1, 1]), ("dense", [3, 2])):
        pre = FramePreprocessor(
            ModelConfig("baseline", 1, image_size=(32, 16), seq_len=10, test_sampling=rule).preprocess
        )
        data = TestClipDataset(tracklets[:2], pre)
        clips, index = data[0]
        assert index == 0 and torch.equal(clips, pre.clips(tracklets[0].frames))
        batch, counts, indices = collate_test([data[0], data[1]])
        assert counts.tolist() == clips_per_tracklet and indices.tolist() == [0, 1]
        assert batch.shape == (sum(clips_per_tracklet), 10, 3, 32, 16)


def test_test_clips_skip_policy(tracklets):
    Path(tracklets[2].frames[0]).write_bytes(b"")
    pre = FramePreprocessor(
        ModelConfig("baseline", 1, image_size=(32, 16), seq_len=6, test_sampling="uniform").preprocess
    )
    with pytest.raises(FrameError, match=tracklets[2].frames[0]):
        TestClipDataset(tracklets, pre)[2]
    data = TestClipDataset(tracklets, pre, on_bad_frame="skip")
    clips, _ = data[2]
    assert clips.shape == (1, 6, 3, 32, 16) and data.bad_frames == 1
    frame_1 = pre.frame_tensor(Image.open(tracklets[2].frames[1]))
    assert torch.equal(clips[0, 0], frame_1)  # frame 0 (unreadable) replaced by its neighbour
