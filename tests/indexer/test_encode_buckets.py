"""The encoder's inference path: bucket padding and stored-dtype weights never change a vector."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from vvireid.indexer.encode import TrackletEncoder, tracklet_features
from vvireid.model.config import ModelConfig
from vvireid.model.factory import available_methods, create_model

SEQ_LEN = 4


def _model(method: str, tiny_kwargs: dict) -> torch.nn.Module:
    cameras = 3 if method == "xreid" else 0
    config = ModelConfig(method, 5, seq_len=SEQ_LEN, num_cameras=cameras, **tiny_kwargs)
    return create_model(config).eval()


@pytest.mark.parametrize("method", available_methods())
def test_bucket_padding_keeps_every_tracklet_vector(method, tiny_kwargs, make_clips):
    model = _model(method, tiny_kwargs)
    # Dense-style items (several clips each) and, for X-ReID, known and unknown cameras mixed.
    sets = [make_clips(n, SEQ_LEN) for n in (1, 3, 2, 1, 2)]
    camids = [0, 2, None, 1, None]
    reference = []
    for clips, camid in zip(sets, camids, strict=True):
        cams = None if camid is None else torch.full((len(clips),), camid)
        feats = model.encode(clips, cams if model.config.num_cameras else None, normalize=False)
        reference.append(tracklet_features(feats, [len(clips)], model.similarity)[0])
    encoder = TrackletEncoder(copy.deepcopy(model), device="cpu", batch_size=4, compile=False)
    encoder.runner.pad = True  # what a compiled encoder does: every call padded to a bucket
    calls = []
    run = encoder.runner._encode
    encoder.runner._encode = lambda c, k: calls.append(len(c)) or run(c, k)
    got = encoder.encode_prepared(sets, camids)
    assert set(calls) <= {1, 2, 4} and len(calls) >= 2  # padded to buckets, cut at batch_size
    np.testing.assert_allclose(got, torch.stack(reference).numpy(), atol=1e-5, rtol=1e-5)


def test_encoder_defaults_follow_the_device(tiny_kwargs):
    encoder = TrackletEncoder(_model("vld", tiny_kwargs), device="cpu", batch_size=12)
    assert encoder.runner.buckets == (1, 2, 4, 8, 12)  # the largest bucket is the batch limit
    assert not encoder.runner.compiled and encoder.runner.dtype == torch.float32
    assert next(encoder.model.parameters()).dtype == torch.float32
    bf16 = TrackletEncoder(_model("vld", tiny_kwargs), device="cpu", dtype="bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16  # stored, not autocast
    assert bf16.warm_up() >= 0.0
