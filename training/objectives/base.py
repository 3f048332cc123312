"""The contract between a method's named outputs and the trainer's loss.

A trainer never branches on method names: it asks an ``Objective`` for named, already-weighted
loss terms, sums them, logs each by name, and calls the objective's hooks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class TrainBatch:
    """One training batch.

    ``clips`` holds the visible clips first, then the infrared clips, index-aligned: visible clip i
    and infrared clip i (row i + B) belong to the same identity. Shape: clips [2B, T, 3, H, W];
    pids, camids, modalities [2B] (int64; modalities are ``Modality`` values).
    """

    clips: torch.Tensor
    pids: torch.Tensor
    camids: torch.Tensor
    modalities: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = True) -> TrainBatch:
        return TrainBatch(*(t.to(device, non_blocking=non_blocking) for t in self.as_tuple()))

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return self.clips, self.pids, self.camids, self.modalities

    @property
    def num_pairs(self) -> int:
        return self.clips.shape[0] // 2


class Objective:
    """Base class: maps model outputs to a dict of named, weighted loss terms.

    ``weights`` are the recipe's named loss weights (e.g. ``{"v2t": 0.08}``); a subclass lists its
    defaults in ``WEIGHTS`` and unknown names are rejected.
    """

    WEIGHTS: dict[str, float] = {}

    def __init__(self, model: nn.Module, weights: dict[str, float] | None = None) -> None:
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.WEIGHTS))
        if unknown:
            raise ValueError(
                f"unknown loss weight(s) {', '.join(unknown)} for {type(self).__name__}; "
                f"known: {', '.join(sorted(self.WEIGHTS))}"
            )
        self.weights = {**self.WEIGHTS, **weights}

    def __call__(self, out: Any, batch: TrainBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_backward(self, out: Any, batch: TrainBatch) -> None:
        """Called after ``loss.backward()`` and before the optimiser step (e.g. memory updates)."""

    def on_epoch_start(self, model: nn.Module, batches: Iterable[TrainBatch]) -> None:
        """Called before each epoch with every training tracklet once (test transforms)."""

    @property
    def needs_epoch_pass(self) -> bool:
        """Whether ``on_epoch_start`` needs the full pass over the training tracklets."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """Resumable state (e.g. prototype memories); saved in training checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
