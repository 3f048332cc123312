"""Data-parallel training across processes (``torchrun``): process-group setup and batch gathering.

Launch: ``torchrun --nproc_per_node N -m vvireid.training fit ...`` (add ``--nnodes/--node_rank/
--master_addr`` for several machines). Each process reads ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` from the environment, uses NCCL on CUDA and gloo on CPU, draws its own share of
every batch from the identity sampler, and only rank 0 writes files.

Why gather outputs: the batch losses of both methods (weighted-regularisation triplet, batch-hard
triplet, prototype contrast with hardest-sample memory updates) compare every tracklet with every
other of the *global* batch. With plain DDP each rank would only see its share, a smaller and
different batch than the recipe's. So, after the local forward, :func:`gather_outputs` all-gathers
every per-sample output tensor with an autograd-aware gather and rebuilds the global batch in the
:class:`~training.objectives.base.TrainBatch` layout (all visible rows of every rank, then all
infrared rows, index-aligned). Every rank then computes the same loss over the global batch.

Gradient scale: the gather's backward sums the gradients that all ranks send to a rank's rows
(``all_reduce`` + local slice), giving ``W * dL/d(local rows)``; DDP then averages parameter
gradients over the ``W`` ranks, so every rank ends with exactly ``dL/d(theta)`` of the global
loss, the gradient one process would compute on the whole batch. Tensors that are not per-sample
(e.g. text features of all classes) are computed identically on every rank and are not gathered.

What stays per rank: BatchNorm statistics in the heads (converted to ``SyncBatchNorm`` on CUDA so
they also see the global batch, as in the single-GPU recipes; gloo has no SyncBatchNorm kernel, so
CPU runs keep per-rank statistics), and the epoch-start pass of objectives that rebuild memories
(each rank runs it over all training tracklets, so the memories start identical everywhere and the
identical global-batch updates keep them so).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from vvireid.model.device import resolve_device
from vvireid.training.objectives.base import TrainBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, its device, and whether DDP is on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Under torchrun each process takes the GPU of its LOCAL_RANK, so a numbered cuda:N is refused.
TRAIN_DEVICES = ("auto", "cpu", "cuda")


def init_distributed(preference: str = "auto") -> DistInfo:
    """Join the process group described by ``torchrun``'s environment, if there is one.

    Without ``WORLD_SIZE`` (or with 1) this is a single process and nothing is initialised.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if preference not in TRAIN_DEVICES:
        raise ValueError(f"device must be auto, cpu or cuda, got {preference!r}")
    device = resolve_device(preference, local_rank=local_rank)
    if world_size <= 1:
        return DistInfo(0, 1, 0, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=60))
    log.info("rank %d/%d on %s (%s)", rank, world_size, device, backend)
    return DistInfo(rank, world_size, local_rank, device)


def shutdown(info: DistInfo) -> None:
    """Leave the process group (idempotent)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(info: DistInfo, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (e.g. a stop decision or an error message)."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_module(info: DistInfo, module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into ``module`` on every rank (in place)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def all_gather_objects(info: DistInfo, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order."""
    if not info.enabled:
        return [value]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, value)
    return out


def any_flag(info: DistInfo, flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank (e.g. a non-finite loss)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 with a gradient: backward sums what every rank sends to our rows."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_rows(tensor: torch.Tensor, *, differentiable: bool = True) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 (rank order)."""
    if differentiable and tensor.requires_grad:
        return _GatherRows.apply(tensor)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def gather_modality_halves(tensor: torch.Tensor) -> torch.Tensor:
    """Gather a tensor laid out ``[visible rows; infrared rows]`` into the same global layout.

    Rows may be clips (``[2B, ...]``) or frames in clip-major order (``[2B*T, ...]``): the first
    half of the rows belongs to the visible clips in both cases.
    """
    half = tensor.shape[0] // 2
    return torch.cat([gather_rows(tensor[:half]), gather_rows(tensor[half:])], dim=0)


def gather_batch(info: DistInfo, batch: TrainBatch) -> TrainBatch:
    """The global :class:`TrainBatch` (labels only: clips are never gathered, they stay local).

    ``clips`` of the result is the local clips tensor; objectives use the labels and the gathered
    outputs, never the pixels.
    """
    if not info.enabled:
        return batch
    return TrainBatch(
        clips=batch.clips,
        pids=gather_modality_halves(batch.pids),
        camids=gather_modality_halves(batch.camids),
        modalities=gather_modality_halves(batch.modalities),
    )


def gather_outputs(info: DistInfo, out: Any, local_batch: int, num_classes: int | None = None) -> Any:
    """Gather every per-sample tensor field of a model output dataclass across ranks.

    A tensor is per-sample when its first dimension is a multiple of the local batch ``2B``
    (clips, or clip-major frames); others (scalars, anything else) are shared and kept. A tensor
    with exactly ``num_classes`` rows (per-class text features) is ambiguous when ``num_classes``
    is such a multiple too: it is compared across ranks, and kept when it is the same everywhere
    (shared parameters give the same values on every rank; per-sample rows differ). Nested
    dataclasses, tuples, lists and dicts are walked; non-tensor fields are kept.
    """
    if not info.enabled:
        return out
    return _gather_value(out, local_batch, num_classes)


def _is_shared(tensor: torch.Tensor) -> bool:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return all(torch.equal(parts[0], p) for p in parts[1:])


def _gather_value(value: Any, local_batch: int, num_classes: int | None) -> Any:
    if isinstance(value, torch.Tensor):
        rows = value.shape[0] if value.ndim >= 1 else 0
        if rows < local_batch or rows % local_batch:
            return value
        if rows == num_classes and _is_shared(value):
            return value
        return gather_modality_halves(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _gather_value(getattr(value, f.name), local_batch, num_classes)
                   for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    if isinstance(value, (list, tuple)):
        return type(value)(_gather_value(v, local_batch, num_classes) for v in value)
    if isinstance(value, dict):
        return {k: _gather_value(v, local_batch, num_classes) for k, v in value.items()}
    return value
