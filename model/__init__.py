"""vvireid models: CLIP ViT backbone with the VLD and X-ReID methods and a plain CLIP baseline.

Public API::

    from vvireid.model import create_model, load_checkpoint, save_checkpoint, Modality

The names are re-exported lazily, so ``from model.types import Modality`` does not import torch
and open_clip (data tools and readers stay fast to start).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "vvireid.model.checkpoint",
    "load_checkpoint": "vvireid.model.checkpoint",
    "save_checkpoint": "vvireid.model.checkpoint",
    "available_methods": "vvireid.model.factory",
    "create_model": "vvireid.model.factory",
    "FrameError": "vvireid.model.preprocess",
    "FramePreprocessor": "vvireid.model.preprocess",
    "PreprocessConfig": "vvireid.model.preprocess",
    "Modality": "vvireid.model.types",
    "Tracklet": "vvireid.model.types",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
