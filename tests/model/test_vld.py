"""VLD and the CLIP baseline: outputs, hub transposes, STA, IMLP gradients, switches, options."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from vvireid.model.baseline import BaselineModel
from vvireid.model.config import ModelConfig
from vvireid.model.factory import create_model
from vvireid.model.vld import VLD, VLDOutput
from vvireid.training.objectives.base import TrainBatch
from vvireid.training.objectives.vld import VLDObjective

NUM_CLASSES = 3
SEQ_LEN = 4
TOKENS = 1 + 4 * 2  # CLS + the 4x2 patch grid of a 64x32 frame


def make_batch(clips: torch.Tensor) -> TrainBatch:
    """Visible clips first, then infrared, index-aligned; identities 0, 1, 2, 0, 1, 2, ..."""
    count = clips.shape[0]
    pids = torch.arange(count) % NUM_CLASSES
    modalities = (torch.arange(count) >= count // 2).long()
    return TrainBatch(clips=clips, pids=pids, camids=modalities.clone(), modalities=modalities)


def train_step(model: VLD, clips: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    optimizer = torch.optim.AdamW(model.param_groups(1e-3, 1e-4))
    out = model(clips)
    terms = VLDObjective(model)(out, make_batch(clips))
    torch.stack(list(terms.values())).sum().backward()
    optimizer.step()
    return terms


def test_forward_and_encode_shapes(tiny_kwargs: dict[str, Any], make_clips: Callable) -> None:
    model = create_model(ModelConfig("vld", NUM_CLASSES, seq_len=SEQ_LEN, **tiny_kwargs))
    width = model.backbone.width
    clips = make_clips(4)
    out = model(clips)
    assert isinstance(out, VLDOutput)
    for name in ("cls_last", "cls", "proj", "sta"):
        assert getattr(out, name).shape == (4, width), name
    for name in ("logits_cls", "logits_proj", "logits_sta", "text_logits"):
        assert getattr(out, name).shape == (4, NUM_CLASSES), name
    assert out.text_feats.shape == (NUM_CLASSES, model.backbone.proj_dim)
    torch.testing.assert_close(out.text_logits, out.proj @ out.text_feats.t())
    feats = model.encode(clips)
    assert feats.shape == (4, 2 * width) == (4, model.embed_dim)
    assert model.similarity == "inner_product"
    assert model.training  # encode restores the mode it found


def test_encode_is_cls_then_sta_and_per_tracklet(
    tiny_kwargs: dict[str, Any], make_clips: Callable
) -> None:
    """Hub exchange stays inside a tracklet: a clip's feature does not depend on its batch mates."""
    model = create_model(ModelConfig("vld", NUM_CLASSES, seq_len=SEQ_LEN, **tiny_kwargs)).eval()
    clips = make_clips(3)
    feats = model.encode(clips)
    with torch.no_grad():
        out = model(clips)
    torch.testing.assert_close(feats, torch.cat([out.cls, out.sta], dim=1))
    for i in range(3):
        torch.testing.assert_close(
            feats[i : i + 1], model.encode(clips[i : i + 1]), atol=1e-5, rtol=1e-5
        )


def test_hub_tokens_are_inserted_then_transposed_before_every_later_block(
    tiny_kwargs: dict[str, Any], make_clips: Callable
) -> None:
    start = 1
    model = create_model(
        ModelConfig(
            "vld", NUM_CLASSES, seq_len=SEQ_LEN, **tiny_kwargs,
            options={"sth_start_layer": start},
        ),
    )
    model.eval()
    blocks = model.backbone.blocks
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(blocks):
        handles.append(
            block.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
        )
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)))
    batch, t = 2, SEQ_LEN
    with torch.no_grad():
        model.encode(make_clips(batch))
    for handle in handles:
        handle.remove()

    assert inputs[0].shape[1] == TOKENS
    assert inputs[start].shape[1] == TOKENS + t
    hub = model.hub.tokens.detach()
    torch.testing.assert_close(inputs[start][:, TOKENS:], hub.repeat(batch, 1, 1))
    for i in range(start + 1, len(blocks)):
        before = outputs[i - 1].reshape(batch, t, TOKENS + t, -1)
        after = inputs[i].reshape(batch, t, TOKENS + t, -1)
        torch.testing.assert_close(after[:, :, :TOKENS], before[:, :, :TOKENS])
        for f, j in itertools.product(range(t), range(t)):
            # block i input: hub token j of frame f = block i-1 output: hub token f of frame j
            torch.testing.assert_close(after[:, f, TOKENS + j], before[:, j, TOKENS + f])


def reference_features(model: VLD, clips: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Appendix A of the VLD spec transcribed literally: seq-first STA, open_clip internals."""
    visual = model.backbone.visual
    bs, t = clips.shape[:2]
    n, width, start = bs * t, model.backbone.width, model.sth_start
    x = visual.conv1(clips.flatten(0, 1)).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(n, 1, -1), x], 1) + visual.positional_embedding
    x = visual.ln_pre(x)
    length = x.shape[1]
    for i, block in enumerate(visual.transformer.resblocks):
        if i == start:
            x = torch.cat([x, model.hub.tokens.repeat(bs, 1, 1)], 1)
        elif i > start:
            hub = x[:, length:].view(bs, t, t, width).transpose(1, 2).reshape(n, t, width)
            x = torch.cat([x[:, :length], hub], 1)
        if i == len(visual.transformer.resblocks) - 1:
            f_last = x[:, 0]
        x = block(x)
    sta = torch.nn.MultiheadAttention(width, model.sta.attn.num_heads)  # seq-first, as official
    sta.load_state_dict(model.sta.attn.state_dict())
    q = x[:, 0].reshape(bs, t, width).transpose(0, 1)
    kv = x[:, length:].reshape(bs, t * t, width).transpose(0, 1)
    f_h = visual.ln_post(sta(q, kv, kv)[0].transpose(0, 1).reshape(n, width))
    f_cls = visual.ln_post(x)[:, 0]
    f_proj = f_cls @ visual.proj

    def mean_t(z: torch.Tensor) -> torch.Tensor:
        return z.reshape(bs, t, -1).mean(1)

    return mean_t(f_last), mean_t(f_cls), mean_t(f_proj), mean_t(f_h)


@pytest.mark.parametrize("seq_len", [4, 6])
def test_matches_the_reference_pseudocode(
    seq_len: int, tiny_kwargs: dict[str, Any], make_clips: Callable
) -> None:
    model = create_model(
        ModelConfig(
            "vld", NUM_CLASSES, seq_len=seq_len, **tiny_kwargs, options={"sth_start_layer": 1},
        ),
    )
    model.eval()
    clips = make_clips(3, seq_len)
    with torch.no_grad():
        out = model(clips)
        expected = reference_features(model, clips)
    for name, want in zip(("cls_last", "cls", "proj", "sta"), expected, strict=True):
        torch.testing.assert_close(getattr(out, name), want, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(model.encode(clips), torch.cat([expected[1], expected[3]], 1))


def test_sth_start_layer_default_is_third_last_block(tiny_kwargs: dict[str, Any]) -> None:
    model = create_model(ModelConfig("vld", NUM_CLASSES, seq_len=SEQ_LEN, **tiny_kwargs))
    assert model.sth_start == model.backbone.num_blocks - 3


@pytest.mark.parametrize("bad", [-1, 3, 4, "9", 1.0, True])
def test_invalid_sth_start_layer_raises_naming_it(bad: Any, tiny_kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="sth_start_layer"):
        create_model(
            ModelConfig(
                "vld", NUM_CLASSES, seq_len=SEQ_LEN, **tiny_kwargs,
                options={"sth_start_layer": bad},
            ),
        )


def test_invalid_options_raise_naming_them(tiny_kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="num_prompt_tokens=3"):
        create_model(
            ModelConfig("vld", NUM_CLASSES, **tiny_kwargs, options={"num_prompt_tokens": 3}),
        )
    with pytest.raises(ValueError, match="prompt_template"):
        create_model(
            ModelConfig(
                "vld", NUM_CLASSES, **tiny_kwargs,
                options={"prompt_template": "a photo of a person"},
            ),
        )
    with pytest.raises(ValueError, match="use_sta"):
        create_model(ModelConfig("vld", NUM_CLASSES, **tiny_kwargs, options={"use_sta": "yes"}))
    with pytest.raises(ValueError, match="use_stp"):
        create_model(ModelConfig("vld", NUM_CLASSES, **tiny_kwargs, options={"use_stp": True}))
    with pytest.raises(ValueError, match="use_sth"):
        create_model(
            ModelConfig("baseline", NUM_CLASSES, **tiny_kwargs, options={"use_sth": True}),
        )


def test_custom_template_places_context_at_its_placeholders(tiny_kwargs: dict[str, Any]) -> None:
    model = create_model(
        ModelConfig(
            "vld", NUM_CLASSES, **tiny_kwargs,
            options={"num_prompt_tokens": 2, "prompt_template": "X X person"},
        ),
    )
    prompts = model.prompts
    assert prompts.start == 1 and prompts.eot_index == 4  # [SOT, x, x, person, EOT]
    embeddings = prompts.embeddings(model.backbone.text)
    torch.testing.assert_close(embeddings[:, 1:3], prompts.cls_ctx)
    assert embeddings.shape == (NUM_CLASSES, 77, model.backbone.text.width)


def test_default_template_tokenises_to_eot_at_15(tiny_kwargs: dict[str, Any]) -> None:
    model = create_model(ModelConfig("vld", NUM_CLASSES, **tiny_kwargs))
    assert (model.prompts.start, model.prompts.num_tokens, model.prompts.eot_index) == (2, 4, 15)
    assert model.prompts.cls_ctx.shape == (NUM_CLASSES, 4, model.backbone.text.width)
    assert 0.01 < model.prompts.cls_ctx.std().item() < 0.03


def test_text_gradients_reach_only_the_prompts(
    tiny_kwargs: dict[str, Any], make_clips: Callable
) -> None:
    model = create_model(ModelConfig("vld", NUM_CLASSES, seq_len=SEQ_LEN, **tiny_kwargs))
    model.train()
    out = model(make_clips(6))
    VLDObjective(model)(out, make_batch(make_clips(6)))["v2t"].backward()
    assert model.prompts.cls_ctx.grad is not None and model.prompts.cls_ctx.grad.abs().sum() > 0
    text_params = list(model.backbone.text.parameters())
    assert text_params
    assert all(not p.requires_grad and p.grad is None for p in text_params)


def test_all_losses_reach_hub_and_sta(tiny_kwargs: dict[str, Any], make_clips: Callable) -> None:
    model = create_model(ModelConfig("vld", NUM_CLASSES, seq_len=SEQ_LEN, **tiny_kwargs))
    model.train()
    out = model(make_clips(6))
    sum(VLDObjective(model)(out, make_batch(make_clips(6))).values()).backward()
    assert model.hub.tokens.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in model.sta.parameters())
    assert model.classifier_sta.fc.weight.grad.abs().sum() > 0


def test_encode_never_runs_the_text_tower(
    tiny_kwargs: dict[str, Any], make_clips: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = create_model(ModelConfig("vld", NUM_CLASSES, seq_len=SEQ_LEN, **tiny_kwargs))
    text = model.backbone.text
    calls = []
    original = text.encode_embeddings
    monkeypatch.setattr(text, "encode_embeddings", lambda *a: calls.append(1) or original(*a))
    model.encode(make_clips(2))
    assert calls == []
    model.train()(make_clips(2))
    assert calls == [1]


SWITCHES = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize(("use_sth", "use_sta", "use_imlp"), SWITCHES)
def test_every_switch_combination_trains_one_step_and_encodes(
    use_sth: bool, use_sta: bool, use_imlp: bool, tiny_kwargs: dict[str, Any], make_clips: Callable
) -> None:
    model = create_model(
        ModelConfig(
            "vld", NUM_CLASSES, seq_len=SEQ_LEN, **tiny_kwargs,
            options={"use_sth": use_sth, "use_sta": use_sta, "use_imlp": use_imlp},
        ),
    )
    assert (model.hub is not None, model.sta is not None, model.prompts is not None) == (
        use_sth,
        use_sta,
        use_imlp,
    )
    assert (model.backbone.text is not None) == use_imlp
    conv_before = model.backbone.visual.conv1.weight.detach().clone()
    clips = make_clips(6)
    terms = train_step(model, clips)
    assert all(torch.isfinite(v) for v in terms.values())
    assert not torch.equal(model.backbone.visual.conv1.weight, conv_before)
    feats = model.encode(clips)
    assert feats.shape == (6, model.embed_dim)
    assert model.embed_dim == model.backbone.width * (2 if use_sta else 1)
    assert torch.isfinite(feats).all()


def test_seq_len_10(tiny_kwargs: dict[str, Any], make_clips: Callable) -> None:
    model = create_model(ModelConfig("vld", NUM_CLASSES, seq_len=10, **tiny_kwargs))
    assert model.hub.tokens.shape == (10, 10, model.backbone.width)
    train_step(model, make_clips(4, seq_len=10))
    assert model.encode(make_clips(2, seq_len=10)).shape == (2, model.embed_dim)
    with pytest.raises(ValueError, match=r"clips must be \[B, 10, 3, 64, 32\]"):
        model.encode(make_clips(2, seq_len=6))


def test_param_groups_follow_the_official_grouping(tiny_kwargs: dict[str, Any]) -> None:
    model = create_model(ModelConfig("vld", NUM_CLASSES, seq_len=SEQ_LEN, **tiny_kwargs))
    groups = {g["name"]: g for g in model.param_groups(2.5e-5, 1e-4)}
    assert groups["base"]["lr"] == pytest.approx(2.5e-5)
    assert groups["fast"]["lr"] == pytest.approx(6.25e-4)
    assert all(g["weight_decay"] == 1e-4 for g in groups.values())
    fast = {id(p) for p in groups["fast"]["params"]}
    base = {id(p) for p in groups["base"]["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert fast.isdisjoint(base) and fast | base == trainable
    named = dict(model.named_parameters())
    for name, param in named.items():
        expected_fast = name.endswith("bias") or name.startswith(("classifier", "prompts."))
        if param.requires_grad:
            assert (id(param) in fast) == expected_fast, name
    assert id(model.hub.tokens) in base
    assert id(model.sta.attn.in_proj_bias) in fast and id(model.sta.attn.in_proj_weight) in base
    assert id(model.classifier.bn.weight) in fast
    assert id(model.backbone.visual.transformer.resblocks[0].attn.in_proj_bias) in fast
    assert not any(id(p) in fast | base for p in model.backbone.text.parameters())
    assert model.param_groups(1.0, 0.0, fast_lr_mult=10)[1]["lr"] == 10


def test_full_vit_b16_sth_and_sta_add_2_39m_parameters() -> None:
    """The paper's '+2.39M': 6x6x768 hub tokens + a 768-wide 12-head attention (T=6)."""
    model = create_model(
        ModelConfig(
            "vld", 500, backbone="ViT-B-16", image_size=(288, 144), options={"use_imlp": False},
        ),
    )

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert model.sta.attn.num_heads == 12
    assert count(model.hub) == 27_648
    assert count(model.hub) + count(model.sta) == 2_390_016
    assert count(model.backbone.visual) == 86_166_528  # the paper's "Baseline-ViT 86.17M"
    assert model.embed_dim == 1536


def test_baseline_is_vld_with_every_module_off(
    tiny_kwargs: dict[str, Any], make_clips: Callable
) -> None:
    baseline = create_model(ModelConfig("baseline", NUM_CLASSES, seq_len=SEQ_LEN, **tiny_kwargs))
    assert isinstance(baseline, BaselineModel) and baseline.method == "baseline"
    assert baseline.config.options == {}
    assert baseline.hub is None and baseline.sta is None and baseline.prompts is None
    assert baseline.backbone.text is None
    assert baseline.embed_dim == baseline.backbone.width
    plain = create_model(
        ModelConfig(
            "vld", NUM_CLASSES, seq_len=SEQ_LEN, **tiny_kwargs,
            options={"use_sth": False, "use_sta": False, "use_imlp": False},
        ),
    )
    plain.load_state_dict(baseline.state_dict(), strict=True)
    clips = make_clips(2)
    torch.testing.assert_close(baseline.encode(clips), plain.encode(clips), atol=0, rtol=0)
    with torch.no_grad():
        out = baseline.eval()(clips)
    torch.testing.assert_close(baseline.encode(clips), out.cls, atol=0, rtol=0)
    assert out.sta is None and out.logits_sta is None and out.text_logits is None
