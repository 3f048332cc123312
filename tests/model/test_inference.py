"""``InferenceModel``: bucket padding never changes a feature, and bf16 weights stay close to fp32."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from vvireid.model.config import ModelConfig
from vvireid.model.factory import available_methods, create_model
from vvireid.model.inference import InferenceModel, bucket_for, parse_dtype

SEQ_LEN = 4
CPU = torch.device("cpu")


def _model(method: str, tiny_kwargs: dict) -> torch.nn.Module:
    return create_model(ModelConfig(method, 5, seq_len=SEQ_LEN, **tiny_kwargs)).eval()


def _camids(method: str, batch: int) -> torch.Tensor | None:
    return torch.arange(batch) % 2 if method == "xreid" else None


@pytest.mark.parametrize("method", available_methods())
def test_padding_to_buckets_and_chunking_keep_every_feature(method, tiny_kwargs, make_clips):
    model = _model(method, tiny_kwargs)
    clips = make_clips(7, SEQ_LEN)
    camids = _camids(method, 7)
    reference = model.encode(clips, camids)
    runner = InferenceModel(model, CPU, buckets=(2, 4))  # 7 -> a chunk of 4, then 3 padded to 4
    got = runner.encode(clips, camids)
    assert got.dtype == torch.float32 and got.shape == reference.shape
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", available_methods())
def test_bf16_weights_keep_features_within_cosine_0_9999(method, tiny_kwargs, make_clips):
    clips = make_clips(4, SEQ_LEN)
    camids = _camids(method, 4)
    model = _model(method, tiny_kwargs)
    reference = model.encode(clips, camids)
    runner = InferenceModel(copy.deepcopy(model), CPU, dtype=torch.bfloat16, buckets=(4,))
    assert next(runner.model.parameters()).dtype == torch.bfloat16  # stored, not autocast
    cosine = F.cosine_similarity(runner.encode(clips, camids), reference, dim=1)
    assert cosine.min().item() >= 0.9999


def test_warm_up_runs_every_bucket(tiny_kwargs):
    runner = InferenceModel(_model("baseline", tiny_kwargs), CPU, buckets=(1, 3))
    calls = []
    encode = runner._encode
    runner._encode = lambda clips, camids: calls.append(len(clips)) or encode(clips, camids)
    runner.warm_up(with_camids=False)
    assert calls == [1, 3]


def test_bucket_choice_and_dtype_names():
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 8]
    assert parse_dtype("auto", CPU) == torch.float32
    assert parse_dtype("bf16", CPU) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        parse_dtype("fp8", CPU)
    with pytest.raises(ValueError, match="buckets must be positive"):
        InferenceModel(torch.nn.Module(), CPU, buckets=())
