"""The training step never waits for the GPU in the losses, and its fixed-shape forms change no number.

A GPU step that reads a value on the host (``.item()``, ``bool(t)``, ``torch.unique``, boolean
indexing) stalls until the device catches up. Without a GPU these tests run the step on fake CUDA
tensors (``FakeTensorMode``: shapes only), where every such read raises, and check that the
fixed-shape rewrites (CPC memory update and rebuild, per-modality CMCL) give the numbers of the
straightforward forms they replaced.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from vvireid.model.config import ModelConfig
from vvireid.model.factory import create_model
from vvireid.model.types import Modality
from vvireid.training.losses import (
    PrototypeMemory,
    cmcl_distances,
    cmcl_loss,
    masked_mean,
)
from vvireid.training.objectives import create_objective
from vvireid.training.objectives.base import TrainBatch
from vvireid.training.objectives.xreid import XReIDObjective

_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


# ---- CPC memory: fixed-shape update and rebuild = the per-label definition ----------------------
def reference_hardest_update(
    bank: torch.Tensor,
    feats: torch.Tensor,
    pids: torch.Tensor,
    momentum: float,
    candidates: torch.Tensor | None,
) -> tuple[torch.Tensor, list[int]]:
    """The update label by label: lowest cosine among eligible samples, first on ties."""
    bank = bank.clone()
    z = F.normalize(feats, dim=1)
    cosine = (z * bank[pids]).sum(dim=1)  # against the bank before any row moves
    updated = []
    for label in sorted(set(pids.tolist())):
        pool = [
            i
            for i in range(len(pids))
            if pids[i] == label and (candidates is None or bool(candidates[i]))
        ]
        if not pool:
            continue
        hardest = min(pool, key=lambda i: (float(cosine[i]), i))
        bank[label] = F.normalize(momentum * bank[label] + (1 - momentum) * z[hardest], dim=0)
        updated.append(label)
    return bank, updated


def random_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """A bank of 7 labels and a batch with tied samples and labels absent from the batch."""
    generator = torch.Generator().manual_seed(seed)
    num_classes, dim, batch = 7, 5, 12
    bank = F.normalize(torch.randn(num_classes, dim, generator=generator), dim=1)
    feats = torch.randn(batch, dim, generator=generator)
    pids = torch.randint(0, 4, (batch,), generator=generator)  # labels 4..6 never in the batch
    feats[5], pids[5] = feats[2], pids[2]  # exact tie: the first (2) must win
    feats[9], pids[9] = 3.0 * feats[2], pids[2]  # the same cosine after normalising
    momentum = float(torch.rand((), generator=generator))
    candidates = torch.rand(batch, generator=generator) < 0.5
    return bank, feats, pids, momentum, candidates


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("pool", ["all", "some", "none"])
def test_hardest_update_equals_the_per_label_definition(seed: int, pool: str) -> None:
    bank, feats, pids, momentum, candidates = random_case(seed)
    candidates = {"all": None, "some": candidates, "none": torch.zeros_like(candidates)}[pool]
    memory = PrototypeMemory(*bank.shape)
    memory.features.copy_(bank)
    updated = memory.hardest_update(feats, pids, momentum, candidates)
    expected, expected_labels = reference_hardest_update(bank, feats, pids, momentum, candidates)
    torch.testing.assert_close(memory.features, expected, rtol=0, atol=1e-6)
    assert updated.dtype == torch.bool and updated.shape == (bank.shape[0],)
    assert torch.nonzero(updated).flatten().tolist() == expected_labels
    if pool == "none":  # no eligible sample: nothing moves, nothing is reported
        assert not updated.any() and torch.equal(memory.features, bank)


def test_hardest_update_takes_the_first_of_tied_samples() -> None:
    memory = PrototypeMemory(2, 2)
    memory.features.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    tied = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])  # all at cosine 0 to row 0
    distinct = torch.tensor([[0.6, 0.8], [-0.6, 0.8]])
    feats = torch.cat([tied, distinct])
    pids = torch.tensor([0, 0, 0, 1, 1])
    # the first tied sample (0) is ineligible: the next (1) is the hardest, same direction
    updated = memory.hardest_update(feats, pids, 0.5, torch.tensor([False, True, True, True, False]))
    torch.testing.assert_close(memory.features[0], F.normalize(torch.tensor([0.5, 0.5]), dim=0))
    torch.testing.assert_close(memory.features[1], F.normalize(torch.tensor([0.3, 0.9]), dim=0))
    assert updated.tolist() == [True, True]


def test_hardest_update_of_an_empty_batch_changes_nothing() -> None:
    memory = PrototypeMemory(3, 2)
    memory.features.copy_(F.normalize(torch.randn(3, 2), dim=1))
    before = memory.features.clone()
    updated = memory.hardest_update(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), 0.1)
    assert updated.tolist() == [False, False, False]
    assert torch.equal(memory.features, before)


def test_hardest_update_names_a_bad_candidate_mask() -> None:
    memory = PrototypeMemory(3, 2)
    with pytest.raises(ValueError, match="candidates must be a bool mask"):
        memory.hardest_update(torch.randn(2, 2), torch.tensor([0, 1]), 0.1, torch.tensor([1, 0]))


@pytest.mark.parametrize("seed", range(3))
def test_rebuild_keep_equals_the_per_label_mean(seed: int) -> None:
    bank, feats, pids, _, _ = random_case(seed)
    memory = PrototypeMemory(*bank.shape)
    memory.features.copy_(bank)
    memory.rebuild(feats, pids, missing="keep")
    expected = bank.clone()
    for label in set(pids.tolist()):
        expected[label] = F.normalize(feats[pids == label].mean(dim=0), dim=0)
    torch.testing.assert_close(memory.features, expected, rtol=0, atol=1e-6)


# ---- CMCL per modality: masked means = the mean over each modality's rows -----------------------
def cmcl_by_indexing(
    branch: torch.Tensor, target: torch.Tensor, modalities: torch.Tensor, squared: bool
) -> torch.Tensor:
    """The per-modality CMCL with boolean indexing, skipping a modality absent from the batch."""
    total = torch.zeros(())
    for modality in Modality:
        rows = modalities == modality
        if rows.any():
            total = total + cmcl_loss(branch[rows], target[rows], squared)
    return total


def cmcl_by_masks(
    branch: torch.Tensor, target: torch.Tensor, modalities: torch.Tensor, squared: bool
) -> torch.Tensor:
    distances = cmcl_distances(branch, target, squared)
    return sum(masked_mean(distances, modalities == modality) for modality in Modality)


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize(
    "modalities", [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 1, 0, 0]]
)
def test_masked_cmcl_equals_indexed_cmcl_with_gradients(
    modalities: list[int], squared: bool
) -> None:
    modality = torch.tensor(modalities)
    values, grads = [], []
    for form in (cmcl_by_indexing, cmcl_by_masks):
        torch.manual_seed(1)
        branch = torch.randn(5, 6, requires_grad=True)
        target = torch.randn(5, 6)
        loss = form(branch, target, modality, squared)
        loss.backward()
        values.append(loss.detach())
        grads.append(branch.grad)
    torch.testing.assert_close(values[1], values[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-6)


def test_masked_mean_of_an_empty_mask_is_zero_and_bad_masks_are_named() -> None:
    values = torch.tensor([1.0, 2.0, 4.0])
    assert masked_mean(values, torch.zeros(3, dtype=torch.bool)).item() == 0.0
    assert masked_mean(values, torch.tensor([True, False, True])).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        masked_mean(values, torch.tensor([1, 0, 1]))


def test_xreid_cmcl_term_with_one_modality_absent(tiny_kwargs: dict) -> None:
    """A batch of visible clips only: CMCL is the visible mean, the infrared part adds 0."""
    model = create_model(ModelConfig("xreid", 3, seq_len=4, num_cameras=2, **tiny_kwargs)).train()
    objective = create_objective("xreid", model, {})
    assert isinstance(objective, XReIDObjective)
    objective.memories_ready = True  # CPCL against zero banks: only CMCL is checked here
    clips = torch.randn(4, 4, 3, *tiny_kwargs["image_size"])
    visible = torch.full((4,), int(Modality.VISIBLE))
    batch = TrainBatch(clips, torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 1, 0]), visible)
    out = model(batch.clips, batch.camids)
    expected = sum(cmcl_loss(c.branch_mean, c.interacted) for c in out.cii)
    torch.testing.assert_close(objective(out, batch)["cmcl"], expected, rtol=1e-6, atol=1e-6)


# ---- no host read on the step path (fake CUDA tensors) -----------------------------------------
class CrossDeviceCopies(TorchDispatchMode):
    """Records ops that move a tensor between the host and the device (each one a sync)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        devices = {
            t.device.type
            for t in tree_leaves((args, kwargs, out))
            # a 0-dim CPU tensor in a device op is a kernel argument, not a copy
            if isinstance(t, torch.Tensor) and (t.dim() or func in _COPIES)
        }
        if len(devices) > 1:
            self.ops.append(str(func))
        return out


def fake_cuda_step(method: str, options: dict, tiny_kwargs: dict) -> list[str]:
    """Forward, loss terms and the objective's after-backward hook on fake CUDA tensors.

    Raises ``DataDependentOutputException``/``DynamicOutputShapeException`` at the first host
    read; returns the ops that copied between host and device. (The backward pass itself needs a
    real CUDA device to run under fake tensors, so it is not covered here.)
    """
    model = create_model(
        ModelConfig(method, 5, seq_len=4, num_cameras=3, options=options, **tiny_kwargs)
    ).train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to("cuda")
        objective = create_objective(method, model, {})
        if isinstance(objective, XReIDObjective) and objective.use_cpc:
            for memory in objective.memories.values():
                memory.features.copy_(F.normalize(torch.randn_like(memory.features), dim=1))
            objective.memories_ready = True
        pids = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1], device="cuda")
        modalities = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], device="cuda")
        clips = torch.randn(8, 4, 3, *tiny_kwargs["image_size"], device="cuda")
        camids = torch.randint(0, 3, (8,), device="cuda")
        batch = TrainBatch(clips, pids, camids, modalities)
        with CrossDeviceCopies() as copies:
            out = model(batch.clips, batch.camids)
            terms = objective(out, batch)
            loss = torch.stack([t.float() for t in terms.values()]).sum()
            objective.after_backward(out, batch)
        assert loss.device.type == "cuda" and loss.dim() == 0
    return copies.ops


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("vld", {}),
        ("xreid", {}),
        ("xreid", {"cpc_pool": "other", "cii_collapse_guard": "supervise", "cmcl_squared": True}),
    ],
)
def test_step_has_no_host_read_on_cuda(method: str, options: dict, tiny_kwargs: dict) -> None:
    assert fake_cuda_step(method, options, tiny_kwargs) == []


def test_fake_cuda_tensors_catch_host_reads_and_copies() -> None:
    """The check above can fail: host reads of the old forms and a copy to the host are caught."""
    with FakeTensorMode():
        branch, target = torch.randn(4, 3, device="cuda"), torch.randn(4, 3, device="cuda")
        modalities = torch.tensor([0, 0, 1, 1], device="cuda")
        with pytest.raises(DataDependentOutputException):  # bool(rows.any())
            cmcl_by_indexing(branch, target, modalities, squared=False)
        with pytest.raises(DynamicOutputShapeException, match="nonzero"):
            branch[modalities == 0]
        with pytest.raises(DynamicOutputShapeException, match="unique"):
            torch.unique(modalities)
        assert cmcl_by_masks(branch, target, modalities, squared=False).device.type == "cuda"
        with CrossDeviceCopies() as copies:
            branch.sum().cpu()
        assert copies.ops == ["aten._to_copy.default"]


def test_memory_rebuild_keep_has_no_host_read_on_cuda() -> None:
    with FakeTensorMode():
        memory = PrototypeMemory(4, 3).to("cuda")
        memory.rebuild(torch.randn(6, 3, device="cuda"), torch.zeros(6, dtype=torch.long,
                                                                     device="cuda"), missing="keep")
        assert memory.features.device.type == "cuda"
