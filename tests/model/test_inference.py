"""``InferenceModel``: bucket padding never changes a feature, and bf16 weights stay close to fp32."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from vvireid.model.config import ModelConfig
from vvireid.model.factory import available_methods, create_model
from vvireid.model.inference import InferenceModel, bucket_for, buckets_up_to, parse_dtype

SEQ_LEN = 4
CPU = torch.device("cpu")


def _model(method: str, tiny_kwargs: dict) -> torch.nn.Module:
    cameras = 2 if method == "xreid" else 0  # camids must matter for the padding checks
    config = ModelConfig(method, 5, seq_len=SEQ_LEN, num_cameras=cameras, **tiny_kwargs)
    return create_model(config).eval()


def _camids(method: str, batch: int) -> torch.Tensor | None:
    return torch.arange(batch) % 2 if method == "xreid" else None


@pytest.mark.parametrize("method", available_methods())
def test_padding_to_buckets_and_chunking_keep_every_feature(method, tiny_kwargs, make_clips):
    model = _model(method, tiny_kwargs)
    clips = make_clips(7, SEQ_LEN)
    camids = _camids(method, 7)
    reference = model.encode(clips, camids)
    runner = InferenceModel(model, CPU, buckets=(2, 4), pad=True)  # 7 -> 4, then 3 padded to 4
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
    runner = InferenceModel(_model("baseline", tiny_kwargs), CPU, buckets=(1, 3), pad=True)
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


def test_eager_warm_up_is_one_small_call_and_never_pads(tiny_kwargs, make_clips):
    runner = InferenceModel(_model("baseline", tiny_kwargs), CPU, buckets=(1, 4))
    calls = []
    encode = runner._encode
    runner._encode = lambda clips, camids: calls.append(len(clips)) or encode(clips, camids)
    runner.warm_up(with_camids=False)
    runner.encode(make_clips(3, SEQ_LEN))
    assert calls == [1, 3]  # no padding without compile: eager code gains nothing from it


@pytest.mark.parametrize("method", available_methods())
def test_unnormalised_features_match_the_models_own(method, tiny_kwargs, make_clips):
    model = _model(method, tiny_kwargs)
    clips = make_clips(3, SEQ_LEN)
    camids = _camids(method, 3)
    reference = model.encode(clips, camids, normalize=False)
    runner = InferenceModel(model, CPU, buckets=(4,), pad=True, normalize=False)
    torch.testing.assert_close(runner.encode(clips, camids), reference, atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_named(tiny_kwargs, make_clips):
    runner = InferenceModel(_model("xreid", tiny_kwargs), CPU, buckets=(2,))
    with pytest.raises(ValueError, match=r"clips must be \[B, 4, 3"):
        runner.encode(make_clips(2, SEQ_LEN + 1), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="2 clips but 1 camids"):
        runner.encode(make_clips(2, SEQ_LEN), torch.zeros(1, dtype=torch.long))


def test_serving_buckets_end_at_the_batch_limit():
    assert buckets_up_to(1) == (1,)
    assert buckets_up_to(16) == (1, 2, 4, 8, 16)
    assert buckets_up_to(24) == (1, 2, 4, 8, 16, 24)
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        buckets_up_to(0)


def test_unknown_camera_none_and_minus_one_share_one_signature(tiny_kwargs, make_clips):
    model = _model("xreid", tiny_kwargs)
    clips = make_clips(2, SEQ_LEN)
    reference = model.encode(clips, None)
    runner = InferenceModel(model, CPU, buckets=(2,), pad=True)
    seen = []
    encode = runner._encode
    runner._encode = lambda c, k: seen.append(k) or encode(c, k)
    torch.testing.assert_close(runner.encode(clips, None), reference, atol=1e-5, rtol=1e-5)
    assert seen[0].tolist() == [-1, -1]  # None became "unknown camera", a tensor like any other


def test_a_compiler_failure_at_warm_up_falls_back_to_eager(tiny_kwargs, make_clips, caplog):
    model = _model("baseline", tiny_kwargs)
    clips = make_clips(3, SEQ_LEN)
    reference = model.encode(clips)
    runner = InferenceModel(copy.deepcopy(model), CPU, buckets=(4,), pad=True)
    runner.compiled = True  # stands for torch.compile, which costs minutes on this CPU

    def broken(clips, camids):
        raise RuntimeError("Failed to find C compiler")

    runner._encode = broken
    runner.warm_up(with_camids=False)
    assert not runner.compiled and "running the model eagerly" in caplog.text
    torch.testing.assert_close(runner.encode(clips), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", available_methods())
def test_uint8_pixels_are_normalised_on_the_device_to_the_float_features(method, tiny_kwargs):
    from vvireid.model.preprocess import normalize_pixels

    model = _model(method, tiny_kwargs)
    pixels = torch.randint(0, 256, (5, SEQ_LEN, 3, *tiny_kwargs["image_size"]), dtype=torch.uint8)
    camids = _camids(method, 5)
    floats = normalize_pixels(pixels, model.preprocess)
    reference = model.encode(floats, camids)
    runner = InferenceModel(model, CPU, buckets=(2, 4), pad=True)  # 5 -> 4, then 1 padded to 2
    seen = []
    encode = runner._encode
    runner._encode = lambda c, k: seen.append(c.dtype) or encode(c, k)
    got = runner.encode(pixels, camids)
    assert set(seen) == {torch.float32}  # the model never sees raw pixels
    assert (got - reference).abs().max().item() <= 1e-5
    bf16 = InferenceModel(copy.deepcopy(model), CPU, dtype=torch.bfloat16, buckets=(5,))
    cosine = F.cosine_similarity(bf16.encode(pixels, camids), reference, dim=1)
    assert cosine.min().item() >= 0.9999
