"""X-ReID objective: term weights, CPC memories (rebuild, update, gradient), the CMCL guard."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from vvireid.model.backbone import register_tiny_configs
from vvireid.model.config import ModelConfig
from vvireid.model.factory import create_model
from vvireid.model.types import Modality
from vvireid.model.xreid import XReID
from vvireid.training.losses import batch_hard_triplet, cross_entropy
from vvireid.training.objectives import create_objective
from vvireid.training.objectives.base import TrainBatch
from vvireid.training.objectives.xreid import XReIDObjective

NUM_CLASSES, SEQ_LEN, NUM_CAMERAS = 3, 4, 3
IMAGE_SIZE = (64, 32)
ALL_TERMS = {
    "ce_clip",
    "ce_mii",
    "tri_f",
    "tri_p",
    "tri_o",
    "cpcl_vis",
    "cpcl_ir",
    "ce_clip_frame",
    "ce_mii_frame",
    "cmcl",
    "ce_cii",
    "tri_cii",
}


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
    return model.train()


def make_batch(pids: list[int], seed: int = 0) -> TrainBatch:
    """A TrainBatch in the trainer's layout: visible clips, then infrared clips with the same pids."""
    generator = torch.Generator().manual_seed(seed)
    n = 2 * len(pids)
    return TrainBatch(
        clips=torch.randn(n, SEQ_LEN, 3, *IMAGE_SIZE, generator=generator),
        pids=torch.tensor(pids + pids),
        camids=torch.randint(0, NUM_CAMERAS, (n,), generator=generator),
        modalities=torch.tensor(
            [int(Modality.VISIBLE)] * len(pids) + [int(Modality.INFRARED)] * len(pids)
        ),
    )


def memory_batches() -> list[TrainBatch]:
    """Every label in both modalities, in two batches (what the trainer's epoch pass yields)."""
    return [make_batch([0, 1, 2], seed=10), make_batch([2, 0, 1], seed=11)]


def ready_objective(model: XReID, **weights: float) -> XReIDObjective:
    objective = create_objective("xreid", model, weights)
    assert isinstance(objective, XReIDObjective)
    objective.on_epoch_start(model, memory_batches())
    return objective


TRAIN_PIDS = [0, 0, 1, 1]


# ---- terms -----------------------------------------------------------------------------------
def test_terms_are_named_and_weighted_as_the_official_code() -> None:
    model = make_model()
    objective = ready_objective(model, ce_clip_frame=2.0)
    batch = make_batch(TRAIN_PIDS)
    out = model(batch.clips, batch.camids)
    terms = objective(out, batch)
    assert set(terms) == ALL_TERMS
    frame_pids = batch.pids.repeat_interleave(SEQ_LEN)
    torch.testing.assert_close(terms["ce_clip"], 0.25 * cross_entropy(out.logits_clip, batch.pids))
    torch.testing.assert_close(terms["ce_mii"], 0.25 * cross_entropy(out.logits_mii, batch.pids))
    torch.testing.assert_close(terms["tri_o"], batch_hard_triplet(out.o_mean, batch.pids, 0.3))
    torch.testing.assert_close(
        terms["ce_clip_frame"], 2.0 / SEQ_LEN * cross_entropy(out.logits_clip_frame, frame_pids)
    )
    torch.testing.assert_close(
        terms["ce_mii_frame"], 1.0 / SEQ_LEN * cross_entropy(out.logits_mii_frame, frame_pids)
    )
    memory = objective.memories[Modality.INFRARED].features
    logits = F.normalize(out.memory_feat, dim=1) @ memory.t() / 0.05
    torch.testing.assert_close(terms["cpcl_ir"], F.cross_entropy(logits, batch.pids))
    half = len(TRAIN_PIDS)
    expected_cmcl = sum(
        (c.branch_mean[rows] - c.interacted[rows]).norm(dim=1).mean()
        for c in out.cii
        for rows in (slice(0, half), slice(half, None))
    )
    torch.testing.assert_close(terms["cmcl"], expected_cmcl)
    assert all(t.dim() == 0 and torch.isfinite(t) for t in terms.values())


@pytest.mark.parametrize(
    ("options", "absent"),
    [
        ({"use_cpc": False}, {"cpcl_vis", "cpcl_ir"}),
        ({"use_cii": False}, {"cmcl", "ce_cii", "tri_cii"}),
        ({"cii_collapse_guard": "none"}, {"ce_cii", "tri_cii"}),
        (
            {"use_sii": False, "use_lii": False, "use_cii": False},
            {"ce_mii", "tri_o", "ce_mii_frame", "cmcl", "ce_cii", "tri_cii"},
        ),
    ],
)
def test_disabled_parts_have_no_terms(options: dict, absent: set[str]) -> None:
    model = make_model(**options)
    objective = create_objective("xreid", model)
    assert objective.needs_epoch_pass == options.get("use_cpc", True)
    objective.on_epoch_start(model, memory_batches())
    batch = make_batch(TRAIN_PIDS)
    assert set(objective(model(batch.clips, batch.camids), batch)) == ALL_TERMS - absent


def test_unknown_weight_and_missing_epoch_pass_are_errors() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="unknown loss weight"):
        create_objective("xreid", model, {"cpcl": 1.0})
    objective = create_objective("xreid", model)
    batch = make_batch(TRAIN_PIDS)
    with pytest.raises(RuntimeError, match="on_epoch_start"):
        objective(model(batch.clips, batch.camids), batch)


# ---- CPC memories ----------------------------------------------------------------------------
def test_epoch_start_rebuilds_memories_in_eval_mode_without_camera() -> None:
    model = make_model()
    running_mean = model.head_clip.bn.running_mean.clone()
    objective = ready_objective(model)
    assert model.training  # mode restored
    torch.testing.assert_close(model.head_clip.bn.running_mean, running_mean)  # eval: untouched
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.memory_features(b.clips) for b in memory_batches()])
    pids = torch.cat([b.pids for b in memory_batches()])
    modalities = torch.cat([b.modalities for b in memory_batches()])
    for modality, memory in objective.memories.items():
        for label in range(NUM_CLASSES):
            rows = (pids == label) & (modalities == modality)
            expected = F.normalize(feats[rows].mean(0), dim=0)
            torch.testing.assert_close(memory.features[label], expected)


def test_label_missing_in_one_modality_borrows_the_other_prototype() -> None:
    model = make_model()
    objective = create_objective("xreid", model)
    batch = make_batch([0, 1, 2])
    keep = torch.tensor([True, True, False, True, True, True])  # no visible clip of label 2
    partial = TrainBatch(*(t[keep] for t in batch.as_tuple()))
    objective.on_epoch_start(model, [partial])
    vis, ir = (objective.memories[m].features for m in Modality)
    torch.testing.assert_close(vis[2], ir[2])
    assert not torch.allclose(vis[0], ir[0])
    torch.testing.assert_close(vis.norm(dim=1), torch.ones(NUM_CLASSES))


def hardest_rows(
    feats: torch.Tensor, pids: torch.Tensor, pool: torch.Tensor, memory: torch.Tensor
) -> dict[int, torch.Tensor]:
    """The lowest-cosine eligible sample of each label, computed independently of the library."""
    z = F.normalize(feats, dim=1)
    result = {}
    for label in pids.unique().tolist():
        candidates = [i for i in range(len(pids)) if pids[i] == label and pool[i]]
        if candidates:
            cosine = torch.stack([z[i] @ memory[label] for i in candidates])
            result[label] = z[candidates[int(cosine.argmin())]]
    return result


@pytest.mark.parametrize(("pool", "momentum"), [("both", 0.1), ("other", 0.2)])
def test_memory_update_moves_rows_toward_the_hardest_sample(pool: str, momentum: float) -> None:
    model = make_model(cpc_pool=pool, cpc_momentum=momentum)
    objective = ready_objective(model)
    batch = make_batch(TRAIN_PIDS)
    out = model(batch.clips, batch.camids)
    sum(objective(out, batch).values()).backward()
    old = {m: objective.memories[m].features.clone() for m in Modality}
    objective.after_backward(out, batch)
    feats = out.memory_feat.detach()
    for modality in Modality:
        eligible = torch.ones_like(batch.pids, dtype=torch.bool)
        if pool == "other":
            eligible = batch.modalities != modality
        hardest = hardest_rows(feats, batch.pids, eligible, old[modality])
        new = objective.memories[modality].features
        assert set(hardest) == {0, 1}
        for label, sample in hardest.items():
            expected = F.normalize(momentum * old[modality][label] + (1 - momentum) * sample, dim=0)
            torch.testing.assert_close(new[label], expected)
        torch.testing.assert_close(new[2], old[modality][2])  # label 2 not in the batch


def test_cpcl_gradient_reaches_features_never_memories() -> None:
    model = make_model()
    objective = ready_objective(model)
    batch = make_batch(TRAIN_PIDS)
    out = model(batch.clips, batch.camids)
    terms = objective(out, batch)
    before = {m: objective.memories[m].features.clone() for m in Modality}
    grad_feat = torch.autograd.grad(terms["cpcl_vis"] + terms["cpcl_ir"], out.memory_feat)[0]
    assert grad_feat.abs().sum() > 0
    for modality, memory in objective.memories.items():
        assert not memory.features.requires_grad and memory.features.grad is None
        torch.testing.assert_close(
            memory.features, before[modality]
        )  # only after_backward moves it


def test_objective_state_round_trip_and_validation() -> None:
    model = make_model()
    objective = ready_objective(model)
    state = objective.state_dict()
    fresh = create_objective("xreid", model)
    fresh.load_state_dict(state)
    for modality in Modality:
        torch.testing.assert_close(
            fresh.memories[modality].features, objective.memories[modality].features
        )
    batch = make_batch(TRAIN_PIDS)
    assert set(fresh(model(batch.clips, batch.camids), batch)) == ALL_TERMS  # usable at once
    with pytest.raises(ValueError, match="memory_ir"):
        fresh.load_state_dict({"memory_vis": state["memory_vis"]})
    with pytest.raises(ValueError, match="shape"):
        fresh.load_state_dict({**state, "memory_vis": torch.zeros(2, 5)})


# ---- CMCL collapse guard ---------------------------------------------------------------------
def test_cmcl_never_reaches_cii_weights_while_cii_learns_from_its_own_terms() -> None:
    model = make_model()  # cii_collapse_guard="stopgrad"
    objective = ready_objective(model)
    batch = make_batch(TRAIN_PIDS)
    terms = objective(model(batch.clips, batch.camids), batch)
    cii_params = list(model.cii.parameters())
    from_cmcl = torch.autograd.grad(terms["cmcl"], cii_params, retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in from_cmcl)
    from_supervision = torch.autograd.grad(
        terms["ce_cii"] + terms["tri_cii"], cii_params, retain_graph=True, allow_unused=True
    )
    assert all(g is not None for g in from_supervision)
    assert sum(g.abs().sum() for g in from_supervision) > 0
    sii_params = list(model.sii.parameters())
    to_branch = torch.autograd.grad(terms["cmcl"], sii_params, allow_unused=True)
    assert all(g is not None for g in to_branch)  # CMCL trains the branches instead


def optimise_cii_on_cmcl(guard: str, steps: int = 40) -> tuple[float, float]:
    """Train only CII's weights on CMCL; return the first and last CMCL values."""
    model = make_model(use_cpc=False, cii_collapse_guard=guard)
    objective = create_objective("xreid", model)
    batch = make_batch([0, 1])
    optimiser = torch.optim.Adam(model.cii.parameters(), lr=1e-2)
    values = []
    for _ in range(steps):
        optimiser.zero_grad(set_to_none=True)
        cmcl = objective(model(batch.clips, batch.camids), batch)["cmcl"]
        values.append(float(cmcl.detach()))
        cmcl.backward()
        optimiser.step()
    return values[0], values[-1]


def test_cmcl_cannot_be_collapsed_by_cii_under_the_guard() -> None:
    first, last = optimise_cii_on_cmcl("stopgrad")
    assert last == pytest.approx(first, rel=1e-5)
    # The same procedure does collapse CMCL when CII is trained by it (the paper read literally),
    # so the assertion above is a real check of the guard.
    first_unguarded, last_unguarded = optimise_cii_on_cmcl("none")
    assert last_unguarded < 0.2 * first_unguarded


# ---- ablations train -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_cpc": False},
        {"use_sii": False},
        {"use_lii": False},
        {"use_cii": False},
        {"cii_collapse_guard": "supervise", "cpc_pool": "other", "cmcl_squared": True},
        {"camera_embedding": False, "lii_stride": 0, "sii_depth": 1},
    ],
    ids=["full", "no-cpc", "no-sii", "no-lii", "no-cii", "supervise-other", "no-camera"],
)
def test_each_ablation_trains_one_step_and_encodes(options: dict) -> None:
    model = make_model(**options)
    objective = create_objective("xreid", model)
    optimiser = torch.optim.Adam(model.param_groups(5e-4, 1e-4))
    if objective.needs_epoch_pass:
        objective.on_epoch_start(model, memory_batches())
    batch = make_batch(TRAIN_PIDS)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    out = model(batch.clips, batch.camids)
    loss = sum(objective(out, batch).values())
    assert torch.isfinite(loss)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    objective.after_backward(out, batch)
    optimiser.step()
    moved = {
        name
        for name, p in model.named_parameters()
        if name in before and not torch.equal(p, before[name])
    }
    assert any(name.startswith("backbone.") for name in moved)
    assert any(name.startswith("head_clip.") for name in moved)
    if model.has_mii:
        assert any(name.startswith(("sii.", "lii.")) for name in moved)
    feats = model.encode(batch.clips, batch.camids)
    assert feats.shape == (len(batch.pids), model.embed_dim) and torch.isfinite(feats).all()
