"""Optimisers and epoch-wise learning-rate schedules of the two official recipes.

Both official codes hold the learning rate constant within an "epoch" (VLD: 200 iterations, X-ReID:
300) and change it between epochs, so a schedule here is a pure function ``lr(epoch, group_lr)``.
That makes resuming trivial (the epoch number is the whole scheduler state) and lets the unit
tests compare the values against per-epoch tables of the official schedules.

* VLD (official code; docs/fidelity.md V15): timm ``CosineLRScheduler`` with ``t_initial=24``,
  ``warmup_t=3``, ``warmup_lr_init = lr_min = 0.01 * lr`` (one absolute value for every group, not
  scaled by the group's multiplier), ``warmup_prefix=False``: the cosine is not shifted by the
  warm-up, so the peak lr is never reached.
* X-ReID (official code; docs/fidelity.md X19): ``WarmupMultiStepLR`` stepped after each epoch, linear
  warm-up factor 0.1 -> 1 over 10 epochs, x0.1 at epochs 30 and 50 (0-based epoch index).
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from vvireid.training.config import OptimSection, ScheduleSection

log = logging.getLogger(__name__)

LRFunction = Callable[[int, float], float]


def cosine_lr(
    epoch: int,
    group_lr: float,
    *,
    t_initial: int,
    warmup_epochs: int,
    warmup_lr_init: float,
    lr_min: float,
) -> float:
    """timm ``CosineLRScheduler`` (one cycle, no noise, ``warmup_prefix=False``) at ``epoch``.

    During warm-up: ``warmup_lr_init + epoch * (group_lr - warmup_lr_init) / warmup_epochs``;
    afterwards ``lr_min + 0.5 * (group_lr - lr_min) * (1 + cos(pi * epoch / t_initial))``; past
    ``t_initial`` the lr stays at ``lr_min``.
    """
    if epoch < warmup_epochs:
        return warmup_lr_init + epoch * (group_lr - warmup_lr_init) / warmup_epochs
    if epoch >= t_initial:
        return lr_min
    return lr_min + 0.5 * (group_lr - lr_min) * (1 + math.cos(math.pi * epoch / t_initial))


def warmup_multistep_lr(
    epoch: int,
    group_lr: float,
    *,
    warmup_epochs: int,
    warmup_factor: float,
    milestones: tuple[int, ...],
    gamma: float,
) -> float:
    """X-ReID ``WarmupMultiStepLR`` (linear warm-up) at 0-based ``epoch``.

    ``group_lr * w * gamma ** #{m in milestones : m <= epoch}`` with
    ``w = warmup_factor + (1 - warmup_factor) * epoch / warmup_epochs`` while ``epoch <
    warmup_epochs``, else 1.
    """
    factor = 1.0
    if epoch < warmup_epochs:
        alpha = epoch / warmup_epochs
        factor = warmup_factor * (1 - alpha) + alpha
    return group_lr * factor * gamma ** bisect.bisect_right(list(milestones), epoch)


def lr_function(optim: OptimSection) -> LRFunction:
    """The configured schedule as ``f(epoch, group_lr) -> lr``."""
    sched: ScheduleSection = optim.schedule
    if sched.name == "cosine":
        t_initial = sched.t_initial if sched.t_initial is not None else optim.epochs
        floor, start = sched.min_lr_ratio * optim.lr, sched.warmup_lr_ratio * optim.lr
        return lambda epoch, lr: cosine_lr(
            epoch, lr, t_initial=t_initial, warmup_epochs=sched.warmup_epochs,
            warmup_lr_init=start, lr_min=floor,
        )
    if sched.name == "warmup_multistep":
        return lambda epoch, lr: warmup_multistep_lr(
            epoch, lr, warmup_epochs=sched.warmup_epochs, warmup_factor=sched.warmup_factor,
            milestones=tuple(sched.milestones), gamma=sched.gamma,
        )
    if sched.name == "constant":
        return lambda epoch, lr: lr
    raise ValueError(f"unknown schedule {sched.name!r}")


class EpochScheduler:
    """Sets every parameter group's lr from its own base lr at the start of each epoch.

    The group's base lr (``initial_lr``, written by :func:`create_optimizer`) carries the model's
    multiplier; the schedule function decides how it moves. State is the current epoch only.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, fn: LRFunction) -> None:
        self.optimizer = optimizer
        self.fn = fn
        self.epoch = -1
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def set_epoch(self, epoch: int) -> None:
        """Apply the lr of ``epoch`` (0-based) to every group."""
        self.epoch = epoch
        for group in self.optimizer.param_groups:
            group["lr"] = self.fn(epoch, group["initial_lr"])

    def lrs(self, epoch: int) -> list[float]:
        """The lr every group would get at ``epoch`` (for logs and tests)."""
        return [self.fn(epoch, g["initial_lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("epoch", -1) >= 0:
            self.set_epoch(int(state["epoch"]))


def create_optimizer(
    model: nn.Module, optim: OptimSection, *, fused: bool | None = None
) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``model.param_groups(lr, weight_decay)``.

    ``adamw`` is decoupled weight decay (VLD); ``adam`` is coupled L2 (torch's Adam adds
    ``weight_decay * param`` to the gradient, as X-ReID's Adam does).
    Trainable parameters that no group holds are reported (they would silently never train).

    ``fused`` (Adam/AdamW): one kernel for the whole update instead of a few per parameter
    tensor, and it can skip a step on a device-side "found non-finite" flag, which lets the
    trainer check for NaN losses without a host sync per step. Default: on when every trainable
    parameter is a floating-point CUDA tensor (elsewhere the multi-tensor path is as good).
    """
    groups = model.param_groups(optim.lr, optim.weight_decay)
    _check_groups(model, groups)
    for group in groups:
        group["initial_lr"] = group["lr"]
    if fused is None:
        fused = can_fuse(p for g in groups for p in g["params"])
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                 weight_decay=optim.weight_decay, fused=fused or None)
    if optim.optimizer == "adam":
        return torch.optim.Adam(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                weight_decay=optim.weight_decay, fused=fused or None)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum,
                               weight_decay=optim.weight_decay)
    raise ValueError(f"unknown optimizer {optim.optimizer!r}")


def can_fuse(params: Iterable[torch.Tensor]) -> bool:
    """Whether fused Adam(W) applies by default: all parameters floating-point CUDA tensors."""
    params = list(params)
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is a fused Adam/AdamW (it honours a ``found_inf`` flag)."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(
        optimizer.defaults.get("fused")
    )


def _check_groups(model: nn.Module, groups: list[dict[str, Any]]) -> None:
    grouped = {id(p) for g in groups for p in g["params"]}
    left = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
    if left:
        log.warning("%d trainable parameter(s) are in no optimiser group and will not train: %s",
                    len(left), ", ".join(left[:10]))


def create_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSection) -> EpochScheduler:
    """The recipe's epoch-wise schedule bound to ``optimizer``."""
    return EpochScheduler(optimizer, lr_function(optim))


def describe_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Distinct (lr, weight decay) groups with their parameter counts, for the run log."""
    summary: dict[tuple[float, float], int] = {}
    for group in optimizer.param_groups:
        key = (group["initial_lr"], group["weight_decay"])
        summary[key] = summary.get(key, 0) + sum(p.numel() for p in group["params"])
    return [{"lr": lr, "weight_decay": wd, "params": n} for (lr, wd), n in sorted(summary.items())]
