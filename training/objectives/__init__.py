"""Per-method training objectives; ``create_objective`` picks one by the model's method name."""

from __future__ import annotations

import importlib

from torch import nn
from vvireid.training.objectives.base import Objective, TrainBatch

_OBJECTIVES = {
    "baseline": "vvireid.training.objectives.vld:VLDObjective",
    "vld": "vvireid.training.objectives.vld:VLDObjective",
    "xreid": "vvireid.training.objectives.xreid:XReIDObjective",
}


def create_objective(method: str, model: nn.Module, weights: dict[str, float] | None = None) -> Objective:
    """The objective for ``method`` with the recipe's loss ``weights``."""
    if method not in _OBJECTIVES:
        raise ValueError(f"no objective for method {method!r}; known: {', '.join(sorted(_OBJECTIVES))}")
    module_name, class_name = _OBJECTIVES[method].split(":")
    return getattr(importlib.import_module(module_name), class_name)(model, weights)


__all__ = ["Objective", "TrainBatch", "create_objective"]
