"""Generic losses: hand-computed values, gradient routing and the prototype memory updates."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from vvireid.training.losses import (
    PrototypeMemory,
    WeightedRegularizedTriplet,
    batch_hard_triplet,
    cmcl_loss,
    cross_entropy,
    pairwise_euclidean,
    prototype_contrastive_loss,
    visual_to_text_loss,
    wrt_loss,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_pairwise_euclidean_clamps_before_sqrt() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    dist = pairwise_euclidean(x, x)
    assert dist[0, 1].item() == pytest.approx(5.0)
    assert dist[1, 1].item() == pytest.approx(1e-6, rel=1e-3)  # sqrt(1e-12), not 0
    x.requires_grad_(True)
    pairwise_euclidean(x, x).sum().backward()
    assert torch.isfinite(x.grad).all()


# ---- cross entropy --------------------------------------------------------------------------
def test_cross_entropy_hand_values() -> None:
    logits = torch.tensor([[math.log(3.0), 0.0]])
    target = torch.tensor([0])
    assert cross_entropy(logits, target).item() == pytest.approx(math.log(4 / 3))
    smoothed = -(0.75 * math.log(3 / 4) + 0.25 * math.log(1 / 4))  # target dist [0.75, 0.25]
    assert cross_entropy(logits, target, label_smoothing=0.5).item() == pytest.approx(smoothed)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        cross_entropy(logits, torch.tensor([2]))


# ---- WRT (VLD) ------------------------------------------------------------------------------
def wrt_by_hand(points: list[float], pids: list[int]) -> float:
    """1-D features; per-anchor loop over VLD's formula, masked-out entries count 0 in the max."""
    total = 0.0
    for i, a in enumerate(points):
        pos = [max(abs(a - b), 1e-6) for b, p in zip(points, pids, strict=True) if p == pids[i]]
        neg = [abs(a - b) for b, p in zip(points, pids, strict=True) if p != pids[i]]
        top = max(pos)
        w_pos = [math.exp(d - top) for d in pos]
        d_pos = sum(w * d for w, d in zip(w_pos, pos, strict=True)) / (sum(w_pos) + 1e-6)
        w_neg = [math.exp(-d - 0.0) for d in neg]  # max over {-d, 0, ...} is 0
        d_neg = sum(w * d for w, d in zip(w_neg, neg, strict=True)) / (sum(w_neg) + 1e-6)
        total += softplus(d_pos - d_neg)
    return total / len(points)


def test_wrt_matches_hand_computation() -> None:
    points, pids = [0.0, 1.0, 2.5, 4.0, 4.5], [0, 0, 1, 1, 1]
    got = wrt_loss(torch.tensor(points).unsqueeze(1), torch.tensor(pids)).item()
    assert got == pytest.approx(wrt_by_hand(points, pids), rel=1e-5)


def test_wrt_closed_form_on_a_symmetric_batch() -> None:
    # points 0, 1 (pid 0) and 4, 5 (pid 1): every anchor has d_pos = (1 + 1e-6/e) / (1 + 1/e)
    # (weights e^-1 on itself, 1 on its partner); anchors 0 and 5 see negatives at 4 and 5,
    # anchors 1 and 4 at 3 and 4.
    feats = torch.tensor([[0.0], [1.0], [4.0], [5.0]])
    e = math.exp
    d_pos = (1 + 1e-6 * e(-1)) / (1 + e(-1) + 1e-6)
    d_neg_outer = (4 * e(-4) + 5 * e(-5)) / (e(-4) + e(-5) + 1e-6)
    d_neg_inner = (3 * e(-3) + 4 * e(-4)) / (e(-3) + e(-4) + 1e-6)
    expected = (softplus(d_pos - d_neg_outer) + softplus(d_pos - d_neg_inner)) / 2
    assert wrt_loss(feats, torch.tensor([0, 0, 1, 1])).item() == pytest.approx(expected, rel=1e-5)


def test_wrt_negative_term_fades_for_far_negatives_as_in_vld() -> None:
    # With negatives at distance 40, exp(-40) << 1e-6: d_neg ~ 0 and the loss ~ softplus(d_pos).
    feats = torch.tensor([[0.0], [1.0], [40.0], [41.0]])
    pids = torch.tensor([0, 0, 1, 1])
    loss = wrt_loss(feats, pids).item()
    assert loss == pytest.approx(softplus(1 / (1 + math.exp(-1))), rel=1e-4)


def test_wrt_is_not_normalised_and_runs_in_fp32() -> None:
    feats = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    base = wrt_loss(feats, pids)
    assert wrt_loss(3 * feats, pids).item() != pytest.approx(base.item())
    half = WeightedRegularizedTriplet()(feats.half(), pids)
    assert half.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert wrt_loss(feats, pids).item() == pytest.approx(base.item(), rel=1e-6)


# ---- batch-hard triplet (X-ReID) ------------------------------------------------------------
def test_batch_hard_triplet_hand_value() -> None:
    feats = torch.tensor([[0.0], [1.0], [1.5], [3.0]])
    pids = torch.tensor([0, 0, 1, 1])
    # anchors: (dp, dn) = (1, 1.5) (1, 0.5) (1.5, 0.5) (1.5, 2) -> hinge 0, 0.8, 1.3, 0
    assert batch_hard_triplet(feats, pids, margin=0.3).item() == pytest.approx(2.1 / 4, rel=1e-5)


def test_batch_hard_triplet_zero_when_margin_met() -> None:
    feats = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.0, 0.1]], requires_grad=True)
    loss = batch_hard_triplet(feats, torch.tensor([0, 0, 1, 1]), margin=0.3)
    assert loss.item() == 0.0
    loss.backward()
    assert feats.grad.abs().sum().item() == 0.0


def test_batch_hard_triplet_needs_two_identities() -> None:
    with pytest.raises(ValueError, match="two identities"):
        batch_hard_triplet(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


# ---- CPCL and the prototype memory (X-ReID) -------------------------------------------------
def test_cpcl_hand_value_and_gradient_only_to_feats() -> None:
    memory = PrototypeMemory(2, 2)
    memory.features.copy_(torch.eye(2))
    feats = torch.tensor([[3.0, 4.0]], requires_grad=True)  # cosine 0.6 and 0.8 -> logits 12, 16
    loss = memory(feats, torch.tensor([0]))
    assert loss.item() == pytest.approx(math.log1p(math.exp(4.0)), rel=1e-5)
    loss.backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert memory.features.grad is None and not memory.features.requires_grad

    bank = torch.eye(2, requires_grad=True)  # even a bank that wants gradient gets none
    feats2 = torch.tensor([[3.0, 4.0]], requires_grad=True)
    prototype_contrastive_loss(feats2, torch.tensor([1]), bank, temperature=0.05).backward()
    assert bank.grad is None and feats2.grad is not None


def test_memory_rebuild_averages_unnormalised_features() -> None:
    memory = PrototypeMemory(3, 2)
    feats = torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.0, 2.0], [5.0, 5.0]])
    memory.rebuild(feats, torch.tensor([0, 0, 1, 2]))
    expected0 = torch.tensor([0.5, 1.5]) / math.sqrt(2.5)  # mean first, then normalise
    torch.testing.assert_close(memory.features[0], expected0)
    torch.testing.assert_close(memory.features[1], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(memory.features[2], torch.tensor([1.0, 1.0]) / math.sqrt(2))


def test_memory_rebuild_missing_labels() -> None:
    memory = PrototypeMemory(3, 2)
    memory.features.copy_(torch.tensor([[0.0, 1.0]] * 3))
    feats, pids = torch.tensor([[2.0, 0.0]]), torch.tensor([1])
    with pytest.raises(ValueError, match="2 of 3 labels have no sample"):
        memory.rebuild(feats, pids)
    memory.rebuild(feats, pids, missing="keep")
    torch.testing.assert_close(memory.features, torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))


def _memory_and_batch() -> tuple[PrototypeMemory, torch.Tensor, torch.Tensor, torch.Tensor]:
    memory = PrototypeMemory(3, 2)
    memory.features.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    feats = torch.tensor([[1.0, 0.1], [0.2, 1.0], [1.0, -0.5], [1.0, 1.0], [0.0, 2.0]])
    pids = torch.tensor([0, 0, 0, 1, 1])
    modality = torch.tensor([0, 1, 1, 0, 1])
    return memory, feats, pids, modality


def test_hardest_update_uses_lowest_cosine_of_the_pool() -> None:
    memory, feats, pids, _ = _memory_and_batch()
    before = memory.features.clone()
    m = 0.1
    updated = memory.hardest_update(feats, pids, momentum=m)
    z = F.normalize(feats, dim=1)
    # label 0: cosines to [1, 0] are 0.995, 0.196, 0.894 -> sample 1; label 1: 0.707, 1 -> sample 3
    row0 = F.normalize(m * before[0] + (1 - m) * z[1], dim=0)
    row1 = F.normalize(m * before[1] + (1 - m) * z[3], dim=0)
    torch.testing.assert_close(memory.features[0], row0)
    torch.testing.assert_close(memory.features[1], row1)
    torch.testing.assert_close(memory.features[2], before[2])  # label not in the batch
    assert updated.tolist() == [True, True, False]  # a [C] mask: no host read to size it
    assert torch.nonzero(updated).flatten().tolist() == [0, 1]
    torch.testing.assert_close(memory.features.norm(dim=1), torch.ones(3))


def test_hardest_update_with_other_modality_pool() -> None:
    # paper Eq. 2 for the visible memory: only infrared clips (modality 1) are candidates
    memory, feats, pids, modality = _memory_and_batch()
    before = memory.features.clone()
    memory.hardest_update(feats, pids, momentum=0.2, candidates=modality == 1)
    z = F.normalize(feats, dim=1)
    # label 0 candidates: samples 1 (0.196) and 2 (0.894) -> 1; label 1: only sample 4
    torch.testing.assert_close(memory.features[0], F.normalize(0.2 * before[0] + 0.8 * z[1], dim=0))
    torch.testing.assert_close(memory.features[1], F.normalize(0.2 * before[1] + 0.8 * z[4], dim=0))
    # a pool that excludes a label leaves its row alone
    memory2, *_ = _memory_and_batch()
    memory2.hardest_update(feats, pids, momentum=0.2, candidates=pids == 1)
    torch.testing.assert_close(memory2.features[0], before[0])


def test_hardest_update_after_backward_and_state_dict() -> None:
    memory, feats, pids, _ = _memory_and_batch()
    feats = feats.clone().requires_grad_(True)
    loss = memory(feats, pids)
    loss.backward()  # the loss used the old bank
    grad_before_update = feats.grad.clone()
    memory.hardest_update(feats, pids, momentum=0.1)
    assert torch.equal(feats.grad, grad_before_update)
    state = memory.state_dict()
    assert set(state) == {"features"}
    restored = PrototypeMemory(3, 2)
    restored.load_state_dict(state)
    assert torch.equal(restored.features, memory.features)


def test_hardest_update_before_backward_is_refused_by_autograd() -> None:
    memory, feats, pids, _ = _memory_and_batch()
    feats = feats.clone().requires_grad_(True)
    loss = memory(feats, pids)
    memory.hardest_update(feats, pids, momentum=0.1)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_memory_rejects_bad_labels_and_widths() -> None:
    memory = PrototypeMemory(2, 3)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        memory.rebuild(torch.randn(2, 3), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="width"):
        memory.hardest_update(torch.randn(2, 4), torch.tensor([0, 1]), momentum=0.1)
    with pytest.raises(ValueError, match="momentum"):
        memory.hardest_update(torch.randn(2, 3), torch.tensor([0, 1]), momentum=1.5)


# ---- visual-to-text (VLD) and CMCL (X-ReID) -------------------------------------------------
def test_visual_to_text_uses_raw_inner_products() -> None:
    feats = torch.tensor([[1.0, 2.0]], requires_grad=True)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = visual_to_text_loss(feats, text, torch.tensor([1]))  # logits 1, 2
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    loss.backward()
    assert feats.grad.abs().sum() > 0 and text.grad.abs().sum() > 0
    scaled = visual_to_text_loss(2 * feats.detach(), text.detach(), torch.tensor([1]))
    assert scaled.item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)


def test_cmcl_plain_and_squared() -> None:
    branch = torch.tensor([[3.0, 4.0], [1.0, 1.0]], requires_grad=True)
    cii = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    loss = cmcl_loss(branch, cii)
    assert loss.item() == pytest.approx(2.5)  # (5 + 0) / 2
    assert cmcl_loss(branch, cii, squared=True).item() == pytest.approx(12.5)
    loss.backward()
    assert torch.isfinite(branch.grad).all()  # zero distance on row 1 gives no NaN
    with pytest.raises(ValueError, match="same shape"):
        cmcl_loss(branch, cii[:1])
