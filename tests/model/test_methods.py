"""The contract every registered method keeps, checked for each name ``available_methods()`` lists.

A new method added to ``vvireid.model.factory`` is covered here without writing a test: training
forward (named outputs, gradients), the retrieval feature, and the checkpoint round trip. The
second half pins a few encode outputs of seeded tiny models, so that a change which silently moves
the features (preprocessing, a block's order, an init) fails loudly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from vvireid.model.base import ReIDModel
from vvireid.model.checkpoint import load_checkpoint, save_checkpoint
from vvireid.model.config import ModelConfig
from vvireid.model.factory import available_methods, create_model

NUM_CLASSES, NUM_CAMERAS, SEQ_LEN = 5, 2, 4
BATCH = 4  # even: a training batch is visible clips then as many infrared clips


def build(method: str, tiny_kwargs: dict[str, Any], seed: int = 0) -> ReIDModel:
    torch.manual_seed(seed)
    config = ModelConfig(
        method, NUM_CLASSES, seq_len=SEQ_LEN, num_cameras=NUM_CAMERAS, **tiny_kwargs
    )
    return create_model(config)


def camids(batch: int = BATCH) -> torch.Tensor:
    return torch.arange(batch) % NUM_CAMERAS


def output_tensors(out: Any) -> dict[str, torch.Tensor]:
    """The tensor fields of a method's output dataclass (nested outputs flattened by name)."""
    found: dict[str, torch.Tensor] = {}
    for spec in dataclasses.fields(out):
        value = getattr(out, spec.name)
        if isinstance(value, torch.Tensor):
            found[spec.name] = value
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    for key, tensor in output_tensors(item).items():
                        found[f"{spec.name}[{i}].{key}"] = tensor
    return found


@pytest.mark.parametrize("method", available_methods())
def test_forward_gives_named_finite_outputs_with_gradients(
    method: str, tiny_kwargs: dict[str, Any], make_clips: Callable
) -> None:
    model = build(method, tiny_kwargs).train()
    out = model(make_clips(BATCH, SEQ_LEN), camids())
    assert dataclasses.is_dataclass(out), f"{method}: forward must return a dataclass"
    tensors = output_tensors(out)
    for name, tensor in tensors.items():
        assert torch.isfinite(tensor).all(), f"{method}.{name} is not finite"
    logits = [name for name, t in tensors.items() if t.shape[-1] == NUM_CLASSES and t.ndim == 2]
    assert logits, f"{method}: no [B, num_classes] identity logits among {sorted(tensors)}"
    loss = sum(tensors[name].float().logsumexp(dim=-1).mean() for name in logits)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("method", available_methods())
def test_encode_shape_dtype_and_independence_of_batch_mates(
    method: str, tiny_kwargs: dict[str, Any], make_clips: Callable
) -> None:
    model = build(method, tiny_kwargs)
    clips = make_clips(BATCH, SEQ_LEN)
    model.train()
    feats = model.encode(clips, camids())
    assert model.training, "encode must restore the training mode"
    assert feats.shape == (BATCH, model.embed_dim) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    alone = model.encode(clips[1:2], camids()[1:2])
    torch.testing.assert_close(alone, feats[1:2], atol=1e-5, rtol=1e-4)
    if model.similarity == "cosine":
        torch.testing.assert_close(feats.norm(dim=1), torch.ones(BATCH))
    with pytest.raises(ValueError, match="clips must be"):
        model.encode(clips[:, :-1])


@pytest.mark.parametrize("method", available_methods())
def test_checkpoint_round_trip_keeps_config_and_features(
    method: str, tiny_kwargs: dict[str, Any], make_clips: Callable, tmp_path: Path
) -> None:
    model = build(method, tiny_kwargs)
    path = tmp_path / f"{method}.safetensors"
    fingerprint = save_checkpoint(path, model)
    loaded = load_checkpoint(path)
    assert type(loaded) is type(model) and loaded.config == model.config
    assert loaded.fingerprint == fingerprint
    clips = make_clips(BATCH, SEQ_LEN)
    torch.testing.assert_close(
        loaded.encode(clips, camids()), model.encode(clips, camids()), atol=0, rtol=0
    )


# ---- pinned encode outputs ------------------------------------------------------------------
# Feature values of seeded tiny models (``build(method, seed=0)``) on the fixed clips of
# ``pinned_clips()``: the first PINNED_DIMS values of each clip's feature, generated once by
# running this code. To regenerate after an intended change (say why in the commit message):
#   .venv/bin/python tests/model/test_methods.py
# prints the dictionary to paste over PINNED (a new method must be added there too).
PINNED_DIMS = 4
PINNED: dict[str, list[list[float]]] = {
    "baseline": [[-0.287525, -1.942081, 0.66448, -1.488706],
                 [-0.395614, -2.001647, 0.765804, -1.478267]],
    "vld": [[-0.17499, -1.956177, 0.614924, -1.571181],
            [-0.316351, -1.998972, 0.756036, -1.502319]],
    "xreid": [[-0.020178, -0.143492, 0.050785, -0.112721],
              [-0.041966, -0.161298, 0.06093, -0.094307]],
}


def pinned_clips() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(2, SEQ_LEN, 3, 64, 32, generator=generator)


def pinned_values(method: str, tiny_kwargs: dict[str, Any]) -> list[list[float]]:
    model = build(method, tiny_kwargs, seed=0)
    feats = model.encode(pinned_clips(), torch.tensor([0, 1]))
    return [[round(v, 6) for v in row[:PINNED_DIMS].tolist()] for row in feats]


@pytest.mark.parametrize("method", available_methods())
def test_encode_matches_pinned_values(method: str, tiny_kwargs: dict[str, Any]) -> None:
    if method not in PINNED:
        pytest.fail(f"no pinned values for {method!r}: print them (see above) and add them")
    got = torch.tensor(pinned_values(method, tiny_kwargs))
    torch.testing.assert_close(got, torch.tensor(PINNED[method]), atol=1e-4, rtol=0)


if __name__ == "__main__":
    from vvireid.model.backbone import TINY_MODEL, register_tiny_configs

    torch.set_num_threads(1)
    register_tiny_configs()
    kwargs = {"backbone": TINY_MODEL, "image_size": (64, 32)}
    print({m: pinned_values(m, kwargs) for m in available_methods()})  # noqa: T201
