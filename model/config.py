"""Model configuration: the single owner of every value the model and the data both need."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from vvireid.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model from a checkpoint file alone.

    ``options`` holds the method's own switches (e.g. ``use_sth``); it must stay JSON-serialisable
    because checkpoints store the config as JSON, never as pickled objects.
    """

    method: str
    num_classes: int
    backbone: str = "ViT-B-16"
    image_size: tuple[int, int] = (288, 144)
    seq_len: int = 6
    num_cameras: int = 0
    test_sampling: str = "rrs_test"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # JSON and YAML give lists; the config is hashable and compared as tuples.
        for key in ("image_size", "mean", "std"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        height, width = self.image_size
        if height % 16 or width % 16:
            raise ValueError(f"image_size {self.image_size} must be a multiple of the 16-px patch")
        json.dumps(self.options)  # fail early on options a checkpoint could not store

    @property
    def preprocess(self) -> PreprocessConfig:
        """The input pipeline this model expects (resize, normalisation, test-time sampling)."""
        return PreprocessConfig(
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
            seq_len=self.seq_len,
            test_sampling=self.test_sampling,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)


def model_default(name: str) -> Any:
    """The default of a :class:`ModelConfig` field, for schemas that expose it (training recipes).

    Reading it from here keeps each default in one place: change it in ``ModelConfig`` and the
    training recipe schema follows.
    """
    spec = ModelConfig.__dataclass_fields__[name]
    if spec.default is dataclasses.MISSING:
        raise KeyError(f"ModelConfig.{name} has no default")
    return spec.default
