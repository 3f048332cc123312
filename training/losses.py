"""Generic re-identification losses. They know nothing of methods: ``objectives/<method>.py`` picks
the features, the weights and the names of the terms.

Every loss computes in float32 with autocast disabled, whatever the input dtype: the distances,
softmax weights and temperature-scaled logits below are where fp16 loses precision or overflows.

Shapes: ``feats`` ``[B, D]``, ``pids`` ``[B]`` int64 labels in ``[0, C)`` for classifier-like
losses (any integers for the metric losses), ``logits`` ``[B, C]``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

_DIST_CLAMP = 1e-12  # squared distances are clamped here before sqrt (both reference codes)
_SOFTMAX_EPS = 1e-6  # added to the masked-softmax denominator in VLD's WRT


@contextlib.contextmanager
def _fp32(device: torch.device) -> Iterator[None]:
    """Run the enclosed ops in float32 even inside an autocast region."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def _check_feats_pids(feats: Tensor, pids: Tensor, name: str = "feats") -> None:
    if feats.dim() != 2:
        raise ValueError(f"{name} must be [B, D], got shape {tuple(feats.shape)}")
    if pids.dim() != 1 or pids.shape[0] != feats.shape[0]:
        raise ValueError(
            f"pids must be [B] with B={feats.shape[0]} (rows of {name}), got {tuple(pids.shape)}"
        )
    if pids.dtype.is_floating_point or pids.dtype == torch.bool or pids.is_complex():
        raise ValueError(f"pids must be an integer tensor, got {pids.dtype}")


def _check_class_range(pids: Tensor, num_classes: int, what: str) -> None:
    """Labels within [0, C). On an accelerator the check is a device-side assert, not a read:
    a read would make every training step wait for the GPU (the trainer's labels come from the
    dataset's own relabelling into [0, C), so this is a last line of defence there)."""
    if not pids.numel():
        return
    if pids.device.type != "cpu":
        torch._assert_async(
            ((pids >= 0) & (pids < num_classes)).all(),
            f"pids must lie in [0, {num_classes}) for {what}",
        )
        return
    if int(pids.min()) < 0 or int(pids.max()) >= num_classes:
        raise ValueError(
            f"pids must lie in [0, {num_classes}) for {what}, "
            f"got min {int(pids.min())} and max {int(pids.max())}"
        )


def pairwise_euclidean(x: Tensor, y: Tensor) -> Tensor:
    """Euclidean distances ``sqrt(clamp(|x|^2 + |y|^2 - 2 x.y, 1e-12))``, as both methods compute.

    The clamp keeps the gradient of sqrt finite at zero distance, so an anchor's distance to
    itself is 1e-6, not 0.

    Shape: ``x`` ``[N, D]``, ``y`` ``[M, D]`` -> ``[N, M]`` float32.
    """
    with _fp32(x.device):
        x, y = x.float(), y.float()
        sq = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * (x @ y.t())
        return sq.clamp(min=_DIST_CLAMP).sqrt()


def cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean softmax cross-entropy; both methods use it plain (no smoothing) for their ID losses.

    A thin wrapper over ``F.cross_entropy`` that computes in float32 and names bad shapes.
    Shape: ``logits`` ``[B, C]``, ``targets`` ``[B]``.
    """
    _check_feats_pids(logits, targets, "logits")
    _check_class_range(targets, logits.shape[1], "cross_entropy")
    with _fp32(logits.device):
        return F.cross_entropy(logits.float(), targets.long(), label_smoothing=label_smoothing)


def _masked_softmax(values: Tensor, mask: Tensor) -> Tensor:
    """VLD/AGW's masked softmax over each row.

    The row maximum is taken over ``values * mask``, so entries outside the mask count as 0 in it.
    For the negative term (``values = -distance <= 0``) that maximum is therefore 0 and nothing is
    subtracted: the weights are ``exp(-d) / (sum exp(-d) + 1e-6)``. Once ``sum exp(-d)`` over the
    negatives falls near 1e-6 (closest negatives farther than about 14) the negative weights, and
    with them the negative distance term, fade toward 0. This is the official code's behaviour and is
    kept on purpose, so that the loss values match VLD's.
    """
    row_max = (values * mask).max(dim=1, keepdim=True).values
    expo = torch.exp(values - row_max) * mask
    return expo / (expo.sum(dim=1, keepdim=True) + _SOFTMAX_EPS)


def wrt_loss(feats: Tensor, pids: Tensor) -> Tensor:
    """Weighted regularized triplet loss (AGW), exactly as VLD computes it.

    Features are not normalised. For each anchor, positives (same pid, the anchor itself
    included) are weighted by a softmax of their distances and negatives by a softmax of minus
    their distances; the loss is ``mean softplus(d_pos - d_neg)`` (SoftMarginLoss with target 1).
    Positives and negatives mix modalities.

    Shape: ``feats`` ``[B, D]``, ``pids`` ``[B]``. Returns a scalar.
    """
    _check_feats_pids(feats, pids)
    with _fp32(feats.device):
        dist = pairwise_euclidean(feats, feats)
        is_pos = (pids.unsqueeze(0) == pids.unsqueeze(1)).float()
        is_neg = 1.0 - is_pos
        dist_ap = dist * is_pos
        dist_an = dist * is_neg
        d_pos = (dist_ap * _masked_softmax(dist_ap, is_pos)).sum(dim=1)
        d_neg = (dist_an * _masked_softmax(-dist_an, is_neg)).sum(dim=1)
        return F.softplus(d_pos - d_neg).mean()


class WeightedRegularizedTriplet(nn.Module):
    """Module form of :func:`wrt_loss` (no parameters)."""

    def forward(self, feats: Tensor, pids: Tensor) -> Tensor:
        return wrt_loss(feats, pids)


def batch_hard_triplet(feats: Tensor, pids: Tensor, margin: float = 0.3) -> Tensor:
    """Batch-hard triplet loss, as X-ReID computes it.

    Un-normalised features, Euclidean distance; per anchor the farthest positive and the closest
    negative; ``mean relu(d_pos - d_neg + margin)`` (``MarginRankingLoss`` with target 1).

    Shape: ``feats`` ``[B, D]``, ``pids`` ``[B]``. Returns a scalar.

    Raises:
        ValueError: if the batch holds a single identity (no negatives to mine).
    """
    _check_feats_pids(feats, pids)
    is_pos = pids.unsqueeze(0) == pids.unsqueeze(1)
    if pids.device.type != "cpu":  # no host read per step on an accelerator (see above)
        torch._assert_async(~is_pos.all(), "batch_hard_triplet needs at least two identities")
    elif bool(is_pos.all()):
        raise ValueError("batch_hard_triplet needs at least two identities in the batch")
    with _fp32(feats.device):
        dist = pairwise_euclidean(feats, feats)
        d_pos = dist.masked_fill(~is_pos, float("-inf")).max(dim=1).values
        d_neg = dist.masked_fill(is_pos, float("inf")).min(dim=1).values
        return F.margin_ranking_loss(d_neg, d_pos, torch.ones_like(d_neg), margin=margin)


def prototype_contrastive_loss(
    feats: Tensor, pids: Tensor, memory: Tensor | PrototypeMemory, temperature: float = 0.05
) -> Tensor:
    """Cross-modality prototype contrastive loss (X-ReID's CPCL) against one memory.

    ``CE(normalize(feats) @ memory.T / temperature, pids)``: cosine logits over every prototype.
    The memory is a constant here (no gradient); it moves only through
    :meth:`PrototypeMemory.hardest_update`.

    Shape: ``feats`` ``[B, D]``, ``pids`` ``[B]`` in ``[0, C)``, ``memory`` ``[C, D]``.
    """
    bank = memory.features if isinstance(memory, PrototypeMemory) else memory
    _check_feats_pids(feats, pids)
    if bank.dim() != 2 or bank.shape[1] != feats.shape[1]:
        raise ValueError(
            f"memory must be [C, {feats.shape[1]}] to match feats, got {tuple(bank.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_class_range(pids, bank.shape[0], "the prototype memory")
    with _fp32(feats.device):
        z = F.normalize(feats.float(), dim=1)
        logits = z @ bank.detach().float().t() / temperature
        return F.cross_entropy(logits, pids.long())


class PrototypeMemory(nn.Module):
    """One bank of per-identity prototypes (X-ReID's ``M_vis`` or ``M_ir``), unit rows.

    The bank is a buffer, so it is saved in ``state_dict`` (and checkpoints) and moved by
    ``.to(device)``, but never trained by the optimiser.

    Life cycle per the X-ReID code: :meth:`rebuild` at the start of every epoch from the features
    of all training tracklets of one modality; each iteration compute the CPCL loss with the
    current bank (``memory(feats, pids)``), call ``backward``, and only then call
    :meth:`hardest_update`. The update is in place: calling it before ``backward`` makes autograd
    raise, because the loss saved the old bank.

    Args:
        num_classes: C, the number of training identities.
        dim: D, the feature width.
        temperature: CPCL temperature used by :meth:`forward` (0.05 in X-ReID).
    """

    features: Tensor

    def __init__(self, num_classes: int, dim: int, temperature: float = 0.05) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got {num_classes} and {dim}")
        self.temperature = temperature
        self.register_buffer("features", torch.zeros(num_classes, dim))

    @property
    def num_classes(self) -> int:
        return self.features.shape[0]

    def forward(self, feats: Tensor, pids: Tensor) -> Tensor:
        """CPCL of ``feats`` against this bank (see :func:`prototype_contrastive_loss`)."""
        return prototype_contrastive_loss(feats, pids, self.features, self.temperature)

    @torch.no_grad()
    def rebuild(self, feats: Tensor, pids: Tensor, *, missing: str = "raise") -> None:
        """Set each row to the L2-normalised mean of the (un-normalised) features of its label.

        Fixed shapes over all C rows (no boolean indexing), so with ``missing="keep"`` it never
        waits for the GPU; ``"raise"`` reads the label counts once to name the absent labels.

        Args:
            feats: ``[N, D]`` features of the tracklets, e.g. all training tracklets of one
                modality.
            pids: ``[N]`` labels in ``[0, C)``.
            missing: what to do with labels that have no sample: ``"raise"`` (default; X-ReID
                assumes every label occurs in every modality) or ``"keep"`` their previous row
                (zeros for a fresh bank, i.e. a cosine of 0 with every feature).

        Raises:
            ValueError: on bad shapes or labels, or a missing label with ``missing="raise"``.
        """
        if missing not in ("raise", "keep"):
            raise ValueError(f"missing must be 'raise' or 'keep', got {missing!r}")
        self._check_batch(feats, pids)
        pids = pids.to(device=self.features.device, dtype=torch.long)
        counts = torch.zeros_like(self.features[:, 0]).index_add_(
            0, pids, torch.ones_like(pids, dtype=self.features.dtype)
        )
        present = counts > 0
        if missing == "raise" and not bool(present.all()):
            absent = torch.nonzero(~present).flatten()
            shown = ", ".join(str(int(p)) for p in absent[:10])
            raise ValueError(
                f"rebuild: {absent.numel()} of {self.num_classes} labels have no sample "
                f"(first: {shown}); pass missing='keep' to keep their previous rows"
            )
        sums = torch.zeros_like(self.features)
        sums.index_add_(0, pids, feats.detach().to(self.features))
        means = F.normalize(sums / counts.clamp(min=1).unsqueeze(1), dim=1)
        self.features.copy_(torch.where(present.unsqueeze(1), means, self.features))

    @torch.no_grad()
    def hardest_update(
        self, feats: Tensor, pids: Tensor, momentum: float, candidates: Tensor | None = None
    ) -> Tensor:
        """Move each batch label's row toward its hardest (lowest-cosine) eligible sample.

        For every label with at least one eligible sample, among its eligible normalised features
        take the one with the lowest cosine to the current row (the first on ties) and set
        ``row = normalize(momentum * row + (1 - momentum) * hardest)``. Other rows are unchanged.

        It runs every training step, so every tensor has a shape known in advance (per-label
        minima scattered over all C labels, masks instead of boolean indexing or ``torch.unique``):
        on a GPU nothing here waits for the device to size an output.

        Args:
            feats: ``[B, D]`` the batch features the loss used (normalised here).
            pids: ``[B]`` labels in ``[0, C)``.
            momentum: weight of the old row, in [0, 1] (X-ReID code 0.1, paper 0.2).
            candidates: optional ``[B]`` bool mask of eligible samples. ``None`` = every clip of
                the label in the batch, both modalities (X-ReID code); the paper's Eq. 2 uses only
                the other modality's clips (pass ``modality != this memory's modality``).
                Ineligible samples are never chosen and do not make their label count as updated.

        Returns:
            ``[C]`` bool mask of the labels whose rows were updated, on the memory's device.
            ``torch.nonzero(mask).flatten()`` lists them ascending (that read waits for the GPU).
        """
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self._check_batch(feats, pids)
        device, batch = self.features.device, pids.shape[0]
        eligible = self._eligible(candidates, pids)
        if batch == 0:
            return torch.zeros(self.num_classes, dtype=torch.bool, device=device)
        z = F.normalize(feats.detach().to(device=device, dtype=self.features.dtype), dim=1)
        labels = pids.to(device=device, dtype=torch.long)
        rows = self.features[labels]
        cosine = (z * rows).sum(dim=1)
        if eligible is not None:
            cosine = cosine.masked_fill(~eligible, float("inf"))
        lowest = torch.full_like(self.features[:, 0], float("inf"))
        lowest = lowest.scatter_reduce(0, labels, cosine, reduce="amin")
        is_hardest = cosine == lowest[labels]
        if eligible is not None:
            is_hardest &= eligible
        position = torch.arange(batch, device=device).masked_fill(~is_hardest, batch)
        first = torch.full((self.num_classes,), batch, dtype=torch.long, device=device)
        first = first.scatter_reduce(0, labels, position, reduce="amin")
        updated = first < batch  # False: no eligible sample of the label (or none in the batch)
        # Per sample, its label's new row; samples of one label carry the same row, so writing
        # them all back (duplicate indices) is deterministic. B rows, not C: cheaper on the CPU.
        hardest = z[first[labels].clamp(max=batch - 1)]
        mixed = F.normalize(momentum * rows + (1.0 - momentum) * hardest, dim=1)
        moved = updated[labels].unsqueeze(1)
        self.features.index_put_((labels,), torch.where(moved, mixed, rows))
        return updated

    def _eligible(self, candidates: Tensor | None, pids: Tensor) -> Tensor | None:
        """``candidates`` checked and moved to the memory's device (None: every sample)."""
        if candidates is None:
            return None
        if candidates.dtype != torch.bool or candidates.shape != pids.shape:
            raise ValueError(
                f"candidates must be a bool mask shaped like pids {tuple(pids.shape)}, "
                f"got {candidates.dtype} {tuple(candidates.shape)}"
            )
        return candidates.to(self.features.device)

    def _check_batch(self, feats: Tensor, pids: Tensor) -> None:
        _check_feats_pids(feats, pids)
        if feats.shape[1] != self.features.shape[1]:
            raise ValueError(
                f"feats have width {feats.shape[1]} but the memory holds {self.features.shape[1]}"
            )
        _check_class_range(pids, self.num_classes, "the prototype memory")


def visual_to_text_loss(feats: Tensor, text_feats: Tensor, pids: Tensor) -> Tensor:
    """VLD's visual-to-text ID loss: CE over raw inner products with every identity's text feature.

    No normalisation, no temperature, no label smoothing (VLD code; the paper leaves the
    similarity undefined). Gradient reaches both the visual and the text features.

    Shape: ``feats`` ``[B, D]``, ``text_feats`` ``[C, D]``, ``pids`` ``[B]`` in ``[0, C)``.
    """
    _check_feats_pids(feats, pids)
    if text_feats.dim() != 2 or text_feats.shape[1] != feats.shape[1]:
        raise ValueError(
            f"text_feats must be [C, {feats.shape[1]}] to match feats, "
            f"got {tuple(text_feats.shape)}"
        )
    _check_class_range(pids, text_feats.shape[0], "the text features")
    with _fp32(feats.device):
        logits = feats.float() @ text_feats.float().t()
        return F.cross_entropy(logits, pids.long())


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` holds, and 0 when it holds nowhere.

    The same number as ``values[mask].mean()`` (or skipping the term when the mask is empty), but
    in fixed shapes: boolean indexing and ``bool(mask.any())`` each make a GPU step wait for the
    device, whereas here the count stays on the device (``clamp(min=1)`` keeps an empty mask at 0).

    Shape: ``values`` ``[B]``, ``mask`` ``[B]`` bool. Returns a scalar in ``values``' dtype.
    """
    if mask.dtype != torch.bool or mask.shape != values.shape:
        raise ValueError(
            f"mask must be a bool tensor shaped like values {tuple(values.shape)}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    return values.masked_fill(~mask, 0).sum() / mask.sum().clamp(min=1)


def cmcl_distances(branch_mean: Tensor, cii_out: Tensor, squared: bool = False) -> Tensor:
    """Per-clip distances of X-ReID's CMCL: ``||O_i - O_CII,i||_2`` (``squared=True``: squared).

    The objective averages these per modality with :func:`masked_mean`; :func:`cmcl_loss` is their
    plain mean. Shape: both ``[B, D]`` -> ``[B]`` float32.
    """
    if branch_mean.dim() != 2 or branch_mean.shape != cii_out.shape:
        raise ValueError(
            f"cmcl_loss needs two [B, D] tensors of the same shape, "
            f"got {tuple(branch_mean.shape)} and {tuple(cii_out.shape)}"
        )
    with _fp32(branch_mean.device):
        diff = branch_mean.float() - cii_out.float()
        if squared:
            return diff.pow(2).sum(dim=1)
        return torch.linalg.vector_norm(diff, dim=1)


def cmcl_loss(branch_mean: Tensor, cii_out: Tensor, squared: bool = False) -> Tensor:
    """X-ReID's cross-modality consistency loss (paper Eq. 9; absent from the official code).

    ``mean_i ||O_i - O_CII,i||_2`` over clips (``squared=True``: the squared distance). Which side
    carries gradient is the caller's choice (detach one input to stop it).

    Shape: both ``[B, D]``. Returns a scalar.
    """
    return cmcl_distances(branch_mean, cii_out, squared).mean()  # float32 distances already
