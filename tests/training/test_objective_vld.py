"""VLDObjective: which terms exist for each switch, and that the recipe's weights are applied."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from vvireid.model.config import ModelConfig
from vvireid.model.factory import create_model
from vvireid.training.losses import cross_entropy, visual_to_text_loss, wrt_loss
from vvireid.training.objectives import create_objective
from vvireid.training.objectives.base import TrainBatch
from vvireid.training.objectives.vld import VLDObjective

NUM_CLASSES = 3
SEQ_LEN = 4
CLS_TERMS = {"ce_cls", "ce_proj", "wrt_last", "wrt_cls", "wrt_proj"}


def batch_of(clips: torch.Tensor) -> TrainBatch:
    count = clips.shape[0]
    modalities = (torch.arange(count) >= count // 2).long()
    return TrainBatch(clips, torch.arange(count) % NUM_CLASSES, modalities.clone(), modalities)


def outputs(method: str, tiny_kwargs: dict[str, Any], make_clips: Callable, **options: Any):
    model = create_model(
        ModelConfig(method, NUM_CLASSES, seq_len=SEQ_LEN, **tiny_kwargs, options=options),
    ).train()
    clips = make_clips(6)
    return model, model(clips), batch_of(clips)


@pytest.mark.parametrize(
    ("method", "options", "expected"),
    [
        ("vld", {}, CLS_TERMS | {"v2t", "ce_sta", "wrt_sta"}),
        ("vld", {"use_imlp": False}, CLS_TERMS | {"ce_sta", "wrt_sta"}),
        ("vld", {"use_sta": False}, CLS_TERMS | {"v2t"}),
        ("vld", {"use_sth": False, "use_sta": False, "use_imlp": False}, CLS_TERMS),
        ("baseline", {}, CLS_TERMS),
    ],
)
def test_terms_present_per_switch(
    method: str,
    options: dict[str, Any],
    expected: set[str],
    tiny_kwargs: dict[str, Any],
    make_clips: Callable,
) -> None:
    model, out, batch = outputs(method, tiny_kwargs, make_clips, **options)
    terms = create_objective(method, model)(out, batch)
    assert isinstance(create_objective(method, model), VLDObjective)
    assert set(terms) == expected
    assert all(t.ndim == 0 and torch.isfinite(t) and t > 0 for t in terms.values())


def test_default_weights_match_the_official_recipe(
    tiny_kwargs: dict[str, Any], make_clips: Callable
) -> None:
    model, out, batch = outputs("vld", tiny_kwargs, make_clips)
    terms = VLDObjective(model)(out, batch)
    pids = batch.pids
    unweighted = {
        "ce_cls": cross_entropy(out.logits_cls, pids),
        "ce_proj": cross_entropy(out.logits_proj, pids),
        "wrt_last": wrt_loss(out.cls_last, pids),
        "wrt_cls": wrt_loss(out.cls, pids),
        "wrt_proj": wrt_loss(out.proj, pids),
        "v2t": visual_to_text_loss(out.proj, out.text_feats, pids),
        "ce_sta": cross_entropy(out.logits_sta, pids),
        "wrt_sta": wrt_loss(out.sta, pids),
    }
    weights = {"v2t": 0.08, "ce_sta": 0.4}
    for name, value in unweighted.items():
        torch.testing.assert_close(terms[name], weights.get(name, 1.0) * value)
    # v2t is CE over the raw inner products the model reports as text_logits
    torch.testing.assert_close(terms["v2t"], 0.08 * cross_entropy(out.text_logits, pids))


def test_recipe_weights_override_defaults(
    tiny_kwargs: dict[str, Any], make_clips: Callable
) -> None:
    model, out, batch = outputs("vld", tiny_kwargs, make_clips)
    default = VLDObjective(model)(out, batch)
    custom = VLDObjective(model, {"v2t": 1.0, "wrt_sta": 0.5})(out, batch)
    torch.testing.assert_close(custom["v2t"], default["v2t"] / 0.08)
    torch.testing.assert_close(custom["wrt_sta"], default["wrt_sta"] * 0.5)
    torch.testing.assert_close(custom["ce_cls"], default["ce_cls"])
    with pytest.raises(ValueError, match="text_id"):
        VLDObjective(model, {"text_id": 0.08})
