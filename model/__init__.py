"""vvireid models: CLIP ViT backbone with the VLD and X-ReID methods and a plain CLIP baseline.

Public API (prefer importing from the submodules inside the project itself)::

    from model import create_model, load_checkpoint, save_checkpoint, Modality
"""

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.factory import available_methods, create_model
from model.preprocess import FrameError, FramePreprocessor, PreprocessConfig
from model.types import Modality, Tracklet

__all__ = [
    "CheckpointError",
    "FrameError",
    "FramePreprocessor",
    "Modality",
    "PreprocessConfig",
    "Tracklet",
    "available_methods",
    "create_model",
    "load_checkpoint",
    "save_checkpoint",
]
