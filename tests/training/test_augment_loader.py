"""augment_on=device end to end: worker items (uint8 + plans) through a real DataLoader, finished by
the trainer's batch step, give the same TrainBatch as float clips made in the workers."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from vvireid.indexer.sources.splits import DatasetSplits
from vvireid.model.types import Modality, Tracklet
from vvireid.training.data.samplers import CrossModalityIdentitySampler, TrainKey
from vvireid.training.data.transforms import AugmentPlan, build_train_transform
from vvireid.training.data.video_dataset import TrainClipDataset
from vvireid.training.trainer import _config_diff, to_train_batch

SIZE = (32, 16)


def write_tracklet(folder, tid, modality, camid, pid, n, seed):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{tid}_{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (36, 18, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return Tracklet(tid, tuple(paths), modality, camid, pid)


@pytest.fixture()
def splits(tmp_path):
    tracklets = [
        write_tracklet(tmp_path, f"{m.name[0]}{pid}", m, 2 * pid + int(m), pid, 8, 10 * pid + int(m))
        for pid in range(3) for m in (Modality.VISIBLE, Modality.INFRARED)
    ]
    return DatasetSplits("t", tracklets, {}, {}, 3, 6, "rrs_test", True)


def batches(splits, method, augment_on, workers, pair_flip=False):
    sampler = CrossModalityIdentitySampler.from_splits(splits, 2, 2, num_batches=3, seed=0)
    transform = build_train_transform(method, SIZE, pair_flip=pair_flip)
    data = TrainClipDataset(splits.train, transform, seq_len=4, seed=3, augment_on=augment_on)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=workers)
    return [to_train_batch(items, "cpu", transform) for items in loader]


@pytest.mark.parametrize("method,pair_flip", [("vld", False), ("xreid", False), ("vld", True)])
def test_device_augmentation_gives_the_worker_batches(splits, method, pair_flip):
    worker = batches(splits, method, "worker", 0, pair_flip)
    device = batches(splits, method, "device", 2, pair_flip)  # real worker processes
    assert len(worker) == len(device) == 3
    for a, b in zip(worker, device, strict=True):
        assert b.clips.shape == (8, 4, 3, *SIZE) and b.clips.dtype == torch.float32
        assert (a.clips - b.clips).abs().max().item() <= 1e-6
        for x, y in zip(a.as_tuple()[1:], b.as_tuple()[1:], strict=True):
            assert torch.equal(x, y)


def test_device_items_are_uint8_with_plans(splits):
    transform = build_train_transform("vld", SIZE)
    data = TrainClipDataset(splits.train, transform, seq_len=4, augment_on="device")
    item = data[TrainKey(0, 1, 5)]
    assert item["rgb"].dtype == item["ir"].dtype == torch.uint8
    assert item["rgb"].shape == (4, *SIZE, 3)
    assert isinstance(item["ir_plan"], AugmentPlan) and item["ir_plan"].channels.shape == (4,)
    with pytest.raises(ValueError, match="pass the transform that applies them"):
        to_train_batch(torch.utils.data.default_collate([item]))


def test_bad_augment_on_and_a_transform_without_a_split_are_rejected(splits):
    with pytest.raises(ValueError, match="augment_on must be one of"):
        TrainClipDataset(splits.train, build_train_transform("none", SIZE), seq_len=4,
                         augment_on="gpu")
    with pytest.raises(ValueError, match="has none"):
        TrainClipDataset(splits.train, lambda f, m, r: None, seq_len=4, augment_on="device")


def test_where_augmentation_runs_does_not_block_a_resume():
    run = {"data": {"num_workers": 4}, "seed": 1}  # saved before data.augment_on existed
    now = {"data": {"num_workers": 4, "augment_on": "device"}, "seed": 1}
    assert _config_diff(run, now) == []
    assert _config_diff(run, {**now, "seed": 2}) == ["seed (run: 1, now: 2)"]
