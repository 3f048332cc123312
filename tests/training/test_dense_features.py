"""Multi-clip (``dense``) tracklet features: evaluation and the indexer give the same vector, in
the official X-ReID order (average the un-normalised clip features, then L2-normalise the mean)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from vvireid.indexer.encode import TrackletEncoder
from vvireid.model.config import ModelConfig
from vvireid.model.factory import create_model
from vvireid.model.types import Modality, Tracklet
from vvireid.training.report import encode_tracklets


def _tracklet(folder: Path, num_frames: int = 10) -> Tracklet:
    """Frames whose brightness grows along the tracklet, so clip features differ in norm."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    frames = []
    for i in range(num_frames):
        level = 20 + 23 * i
        pixels = np.clip(level + rng.integers(-30, 30, size=(64, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        frames.append(str(folder / f"{i}.png"))
    return Tracklet("t", tuple(frames), Modality.INFRARED, 1, 0)


@pytest.mark.parametrize("method", ["xreid", "vld"])
def test_dense_feature_is_one_code_path_in_the_official_order(tmp_path, tiny_kwargs, method):
    torch.manual_seed(0)
    model = create_model(ModelConfig(method, 5, seq_len=4, num_cameras=3, test_sampling="dense",
                                     **tiny_kwargs)).eval()
    for module in model.modules():  # BN statistics away from identity, as after training
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.2, 3.0)
    tracklet = _tracklet(tmp_path / "t")
    encoder = TrackletEncoder(model, device="cpu", dtype="fp32")
    clips = encoder.prepare(tracklet.frames)
    assert clips.shape[0] == 3  # 4 + 4 + a cycled remainder of 2
    raw = model.encode(clips, torch.full((3,), 1), normalize=False)
    evaluated = encode_tracklets(model, [tracklet], model.preprocess, device=torch.device("cpu"))[0]
    indexed = encoder.encode_frames(tracklet.frames, camid=1)
    np.testing.assert_allclose(evaluated, indexed, rtol=1e-5, atol=1e-6)
    if method == "xreid":
        expected = F.normalize(raw.mean(0), dim=0)
        per_clip_first = F.normalize(F.normalize(raw, dim=1).mean(0), dim=0)
        assert (expected - per_clip_first).abs().max() > 1e-3  # the two orders do differ here
        np.testing.assert_allclose(evaluated, expected.numpy(), rtol=1e-5, atol=1e-6)
        single = model.encode(clips[:1], torch.tensor([1]))  # one clip: exactly encode()
        np.testing.assert_allclose(encoder.encode_prepared([clips[:1]], [1])[0], single[0].numpy(),
                                   rtol=1e-5, atol=1e-6)
    else:  # VLD ranks raw inner products: the raw mean, never normalised
        np.testing.assert_allclose(evaluated, raw.mean(0).numpy(), rtol=1e-5, atol=1e-5)
