"""X-ReID model: outputs, the SII shift, MII blocks, gradient isolation, options and checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from vvireid.model.backbone import register_tiny_configs
from vvireid.model.checkpoint import load_checkpoint, save_checkpoint
from vvireid.model.config import ModelConfig
from vvireid.model.factory import create_model
from vvireid.model.xreid import XReID, XReIDOutput
from vvireid.model.xreid.blocks import CrossAttentionBlock, FirstTokenSelfAttentionBlock
from vvireid.model.xreid.interaction import (
    CrossModalityInteraction,
    LongTermInteraction,
    ShortTermInteraction,
    temporal_channel_shift,
)

NUM_CLASSES, SEQ_LEN, NUM_CAMERAS = 5, 4, 3
IMAGE_SIZE = (64, 32)
WIDTH = PROJ = 64  # vvireid-tiny


def make_model(**options: object) -> XReID:
    register_tiny_configs()
    torch.manual_seed(0)
    model = create_model(
        ModelConfig(
            "xreid", NUM_CLASSES, backbone="vvireid-tiny", image_size=IMAGE_SIZE, seq_len=SEQ_LEN,
            num_cameras=NUM_CAMERAS, options=options,
        ),
    )
    assert isinstance(model, XReID)
    return model


def make_clips(batch: int = 4, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, SEQ_LEN, 3, *IMAGE_SIZE, generator=generator)


@pytest.fixture(scope="module")
def model() -> XReID:
    return make_model()


# ---- outputs ---------------------------------------------------------------------------------
def test_forward_returns_named_training_outputs(model: XReID) -> None:
    model.train()
    out = model(make_clips(), torch.tensor([0, 1, 2, 0]))
    assert isinstance(out, XReIDOutput)
    assert out.logits_clip.shape == out.logits_mii.shape == (4, NUM_CLASSES)
    assert out.logits_clip_frame.shape == out.logits_mii_frame.shape == (4 * SEQ_LEN, NUM_CLASSES)
    assert out.f_mean.shape == out.o_mean.shape == (4, WIDTH)
    assert out.p_mean.shape == (4, PROJ)
    assert out.memory_feat.shape == (4, WIDTH + PROJ) == (4, model.memory_dim)
    assert [c.branch for c in out.cii] == ["sii", "lii"]
    for cii in out.cii:
        assert cii.branch_mean.shape == cii.interacted.shape == (4, WIDTH)
        assert cii.logits is not None and cii.logits.shape == (4, NUM_CLASSES)


def test_encode_is_unit_norm_concatenation_of_bn_features(model: XReID) -> None:
    clips, camids = make_clips(), torch.tensor([0, 1, 2, 0])
    feats = model.encode(clips, camids)
    assert feats.shape == (4, model.embed_dim) == (4, WIDTH + PROJ + WIDTH)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(4))
    model.eval()
    with torch.no_grad():
        out = model(clips, camids)
        expected = torch.cat([out.memory_feat, model.head_mii.bn(out.o_mean)], dim=1)
    torch.testing.assert_close(feats, F.normalize(expected, dim=1))
    assert out.cii == ()  # CII never runs outside training


def test_encode_without_camids_uses_the_mean_camera_embedding(model: XReID) -> None:
    clips = make_clips()
    unknown = model.encode(clips)
    torch.testing.assert_close(unknown, model.encode(clips, torch.full((4,), -1)))
    with_cameras = model.encode(clips, torch.tensor([0, 1, 2, 0]))
    assert not torch.allclose(unknown, with_cameras)  # the camera embedding reaches the feature
    with torch.no_grad():
        saved = model.cv_embed.detach().clone()
        model.cv_embed.copy_(saved.mean(0, keepdim=True).expand_as(saved))
        try:
            torch.testing.assert_close(model.encode(clips, torch.tensor([0, 1, 2, 0])), unknown)
        finally:
            model.cv_embed.copy_(saved)


def test_camids_out_of_range_are_rejected_with_the_range(model: XReID) -> None:
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        model.encode(make_clips(), torch.tensor([0, 1, 7, 0]))
    with pytest.raises(ValueError, match="camids must be"):
        model.encode(make_clips(), torch.tensor([0.0, 1.0, 2.0, 0.0]))


def test_memory_features_do_not_use_the_camera_embedding(model: XReID) -> None:
    model.eval()
    clips = make_clips()
    with torch.no_grad():
        before = model.memory_features(clips)
        saved = model.cv_embed.detach().clone()
        model.cv_embed.add_(5.0)
        try:
            after = model.memory_features(clips)
            with_camera = model(clips, torch.tensor([0, 1, 2, 0])).memory_feat
        finally:
            model.cv_embed.copy_(saved)
    torch.testing.assert_close(before, after)
    assert not torch.allclose(before, with_camera)


def test_bad_clip_shape_names_the_expected_shape(model: XReID) -> None:
    with pytest.raises(ValueError, match=r"clips must be \[B, 4, 3, 64, 32\]"):
        model.encode(torch.zeros(2, 3, 3, 64, 32))


# ---- SII shift and MII blocks ----------------------------------------------------------------
def test_channel_shift_takes_quarters_from_neighbours_out_of_place() -> None:
    patches = torch.randn(2, 5, 3, 8)  # B, T, N, D; fold = 2
    original = patches.clone()
    shifted = temporal_channel_shift(patches)
    torch.testing.assert_close(patches, original)  # input untouched
    for t in range(5):
        prev_t, next_t = max(t - 1, 0), min(t + 1, 4)
        assert torch.equal(shifted[:, t, :, 0:2], original[:, prev_t, :, 0:2])
        assert torch.equal(shifted[:, t, :, 2:4], original[:, next_t, :, 2:4])
        assert torch.equal(shifted[:, t, :, 4:], original[:, t, :, 4:])
    # clips never mix: changing clip 1 leaves clip 0's result alone
    patches[1] += 1.0
    assert torch.equal(temporal_channel_shift(patches)[0], shifted[0])


def test_mii_block_parameter_counts_at_vit_b_width() -> None:
    assert sum(p.numel() for p in CrossAttentionBlock(768).parameters()) == 7_087_104
    assert CrossAttentionBlock(768).attn.heads == 12
    assert sum(p.numel() for p in ShortTermInteraction(768, 2).parameters()) == 14_174_208
    assert sum(p.numel() for p in FirstTokenSelfAttentionBlock(768).parameters()) == 7_085_568


def test_first_token_block_equals_full_self_attention_first_row() -> None:
    torch.manual_seed(0)
    block = FirstTokenSelfAttentionBlock(32, heads=4)
    query, context = torch.randn(3, 32), torch.randn(3, 6, 32)
    tokens = torch.cat([query.unsqueeze(1), context], dim=1)
    normed = block.norm(tokens)
    full = tokens + block.attn(normed, normed, normed)  # all 7 rows attend to all 7
    full = full + block.ffn(full)
    torch.testing.assert_close(block(query, context), full[:, 0])


def test_cross_attention_block_keys_are_normalised_and_values_raw() -> None:
    torch.manual_seed(0)
    block = CrossAttentionBlock(16, heads=2)
    query, tokens = torch.randn(2, 16), torch.randn(2, 5, 16)
    q = block.norm_q(query).unsqueeze(1)
    heads = lambda x: x.view(2, -1, 2, 8).transpose(1, 2)  # noqa: E731
    att = torch.softmax(
        heads(block.attn.q(q))
        @ heads(block.attn.k(block.norm_k(tokens))).transpose(-1, -2)
        / 8**0.5,
        dim=-1,
    )
    mixed = (att @ heads(block.attn.v(tokens))).transpose(1, 2).reshape(2, 1, 16)
    expected = query + block.attn.out(mixed).squeeze(1)
    expected = expected + block.ffn(expected)
    torch.testing.assert_close(block(query, tokens), expected)


def test_lii_frame_t_is_queried_by_the_cls_of_frame_t_plus_stride() -> None:
    torch.manual_seed(0)
    lii = LongTermInteraction(16, stride=2)
    cls, patches = torch.randn(2, 5, 16), torch.randn(2, 5, 3, 16)
    out = lii(cls, patches)
    for t in range(5):
        expected = lii.block(cls[:, (t + 2) % 5], patches[:, t])
        torch.testing.assert_close(out[:, t], expected)


def test_cii_reads_the_partner_clips_patches() -> None:
    torch.manual_seed(0)
    cii = CrossModalityInteraction(16)
    means, patches = torch.randn(4, 16), torch.randn(4, 3, 5, 16)
    partner = XReID._partners(4, None, torch.device("cpu"))
    assert partner.tolist() == [2, 3, 0, 1]  # visible i <-> infrared i
    before = cii(means, patches, partner)
    patches[2] += torch.randn(3, 5, 16)  # not a constant: LayerNorm would remove that
    after = cii(means, patches, partner)
    changed = ~torch.isclose(before, after).all(dim=1)
    assert changed.tolist() == [True, False, False, False]


def test_odd_batch_with_cii_in_training_is_a_clear_error(model: XReID) -> None:
    model.train()
    with pytest.raises(ValueError, match="odd number of clips"):
        model(make_clips(3))


# ---- gradient isolation and frozen parts -----------------------------------------------------
def test_mii_losses_do_not_reach_the_backbone(model: XReID) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(make_clips(), torch.tensor([0, 1, 2, 0]))
    pids = torch.tensor([0, 1, 0, 1])
    loss = (
        F.cross_entropy(out.logits_mii, pids)
        + F.cross_entropy(out.logits_mii_frame, pids.repeat_interleave(SEQ_LEN))
        + out.o_mean.pow(2).sum()
        + sum(c.branch_mean.sum() + c.interacted.sum() + c.logits.sum() for c in out.cii)
    )
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.cv_embed.grad is None
    assert all(p.grad is not None for p in model.sii.parameters())
    assert all(p.grad is not None for p in model.lii.parameters())
    model.zero_grad(set_to_none=True)


def test_cii_does_not_change_the_retrieval_feature(model: XReID) -> None:
    clips = make_clips()
    before = model.encode(clips)
    saved = {k: v.clone() for k, v in model.cii.state_dict().items()}
    with torch.no_grad():
        for param in model.cii.parameters():
            param.add_(1.0)
    try:
        torch.testing.assert_close(model.encode(clips), before)
    finally:
        model.cii.load_state_dict(saved)


def test_patch_projection_and_bn_biases_are_frozen(model: XReID) -> None:
    assert not any(p.requires_grad for p in model.backbone.visual.conv1.parameters())
    for bn in (model.head_clip.bn, model.head_mii.bn, model.bn_mii_frame, model.head_cii.bn):
        assert not bn.bias.requires_grad and bool((bn.bias == 0).all())
        assert bn.weight.requires_grad


def test_param_groups_follow_the_official_lr_rules(model: XReID) -> None:
    groups = model.param_groups(5e-6, 1e-4)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable) == len(lr_of)
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    visual = model.backbone.visual
    expected = {
        visual.transformer.resblocks[0].attn.in_proj_weight: 5e-6,
        visual.transformer.resblocks[0].attn.in_proj_bias: 1e-5,
        model.cv_embed: 5e-6,
        model.head_clip.bn.weight: 5e-6,
        model.head_clip.fc.weight: 5e-5,
        model.head_clip_frame.fc.weight: 5e-5,
        model.sii.blocks[0].attn.q.weight: 5e-5,
        model.sii.blocks[1].attn.out.bias: 1e-4,
        model.lii.block.ffn.fc1.weight: 5e-5,
        model.cii.block.ffn.fc2.bias: 1e-4,
        model.head_mii.bn.weight: 5e-5,
        model.bn_mii_frame.weight: 5e-5,
        model.head_mii.fc.weight: 5e-4,
        model.head_cii.fc.weight: 5e-4,
    }
    for param, lr in expected.items():
        assert lr_of[id(param)] == pytest.approx(lr)
    assert id(visual.conv1.weight) not in lr_of


# ---- options ---------------------------------------------------------------------------------
def test_without_sii_and_lii_the_feature_is_the_global_one() -> None:
    model = make_model(use_sii=False, use_lii=False, use_cii=False)
    assert model.embed_dim == WIDTH + PROJ
    model.train()
    out = model(make_clips())
    assert out.logits_mii is None and out.o_mean is None and out.cii == ()
    assert model.encode(make_clips()).shape == (4, WIDTH + PROJ)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"use_sii": False, "use_lii": False}, "use_cii needs use_sii or use_lii"),
        ({"cpc_pool": "mine"}, "cpc_pool"),
        ({"cii_collapse_guard": "maybe"}, "cii_collapse_guard"),
        ({"sii_depth": 0}, "sii_depth"),
        ({"lii_stride": -1}, "lii_stride"),
        ({"use_tsm": True}, "unknown option"),
    ],
)
def test_invalid_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_model(**options)


def test_checkpoint_round_trip_gives_identical_features(tmp_path) -> None:
    model = make_model()
    model.train()
    model(make_clips(8), torch.arange(8) % NUM_CAMERAS)  # move BN running statistics off init
    path = tmp_path / "xreid.safetensors"
    fingerprint = save_checkpoint(path, model)
    loaded = load_checkpoint(path)
    assert isinstance(loaded, XReID) and loaded.fingerprint == fingerprint
    assert loaded.config == model.config
    clips, camids = make_clips(), torch.tensor([2, 1, 0, -1])
    torch.testing.assert_close(
        loaded.encode(clips, camids), model.encode(clips, camids), rtol=0, atol=0
    )
    assert not any(p.requires_grad for p in loaded.backbone.visual.conv1.parameters())
