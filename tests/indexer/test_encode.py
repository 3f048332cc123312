"""TrackletEncoder: the checkpoint's preprocessing, batched encoding, per-tracklet failures."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from vvireid.indexer.encode import THUMBNAIL_MAX_HEIGHT, TrackletEncoder
from vvireid.model.checkpoint import load_checkpoint
from vvireid.model.config import ModelConfig
from vvireid.model.factory import create_model
from vvireid.model.types import Modality, Tracklet


@pytest.fixture
def encoder(checkpoint) -> TrackletEncoder:
    return TrackletEncoder(load_checkpoint(checkpoint()), device="cpu", batch_size=3, num_workers=2)


def test_prepare_uses_the_checkpoint_sampling_and_size(frames_of, encoder):
    frames = frames_of("a", 9, 0)
    clips = encoder.prepare(frames)
    assert clips.shape == (1, 4, 3, 64, 32)
    # rrs_test on 9 frames, T = 4: chunks of 3 -> frames 0, 3, 6, 8 (model.sampling)
    expected = torch.stack(
        [encoder.preprocessor.frame_tensor(Image.open(frames[i])) for i in (0, 3, 6, 8)]
    )
    assert torch.equal(clips[0], expected)
    with_thumb, thumb = encoder.prepare_with_thumbnail(frames)
    assert torch.equal(with_thumb, clips)
    image = Image.open(io.BytesIO(thumb))
    assert image.format == "JPEG" and image.height <= THUMBNAIL_MAX_HEIGHT


def test_batched_encoding_equals_one_by_one(frames_of, encoder):
    sets = [encoder.prepare(frames_of(f"t{i}", 3 + i, i)) for i in range(5)]
    camids = [0, 1, None, 2, None]
    batched = encoder.encode_prepared(sets, camids)
    single = np.stack(
        [encoder.encode_prepared([s], [c])[0] for s, c in zip(sets, camids, strict=True)]
    )
    assert batched.shape == (5, encoder.dim) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        encoder.encode_frames(frames_of("t0", 3, 0), camid=0), batched[0], rtol=1e-4, atol=1e-5
    )


def test_dense_sampling_averages_clips_and_cosine_normalises(frames_of, tiny_kwargs):
    model = create_model(ModelConfig("xreid", 5, seq_len=4, test_sampling="dense", **tiny_kwargs)).eval()
    encoder = TrackletEncoder(model, device="cpu")
    frames = frames_of("long", 10, 3)
    clips = encoder.prepare(frames)
    assert clips.shape[0] == 3  # 4 + 4 + a cycled remainder of 2
    vector = encoder.encode_prepared([clips], [1])[0]
    mean = model.encode(clips, torch.tensor([1, 1, 1]), normalize=False).mean(0).numpy()
    if model.similarity == "cosine":
        mean = mean / np.linalg.norm(mean)
        assert np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)
    np.testing.assert_allclose(vector, mean, rtol=1e-4, atol=1e-5)


def test_bad_tracklets_become_failures_naming_the_file(tmp_path, frames_of, encoder):
    good = Tracklet("good", tuple(frames_of("good", 4, 1)), Modality.VISIBLE, 0)
    broken_frames = list(frames_of("broken", 4, 2))
    with open(broken_frames[0], "wb") as handle:
        handle.write(b"not a jpeg")
    broken = Tracklet("broken", tuple(broken_frames), Modality.INFRARED, 1)
    missing = Tracklet("missing", (str(tmp_path / "nowhere.jpg"),), Modality.VISIBLE, 0)
    empty = Tracklet("empty", (), Modality.VISIBLE, 0, extra={"source": "list.jsonl:4"})
    chunks = list(encoder.encode_tracklets([good, broken, missing, empty], chunk_size=2))
    assert [(c.start, c.size) for c in chunks] == [(0, 2), (2, 2)]
    encoded = [t.tracklet_id for c in chunks for t in c.tracklets]
    failures = {f.tracklet_id: f for c in chunks for f in c.failures}
    assert encoded == ["good"]
    assert (
        failures["broken"].path == broken_frames[0]
        and "not a readable image" in failures["broken"].reason
    )
    assert (
        failures["missing"].path.endswith("nowhere.jpg")
        and "cannot open" in failures["missing"].reason
    )
    assert failures["empty"].path == "list.jsonl:4" and "no frames" in failures["empty"].reason
    assert chunks[0].thumbnails[0] is not None
