"""Model construction: one table from method name to class."""

from __future__ import annotations

import importlib
from typing import Any

from vvireid.model.base import ReIDModel
from vvireid.model.config import ModelConfig
from vvireid.model.preprocess import IMAGENET_MEAN, IMAGENET_STD

# Lazy "module:Class" references keep `import model` light and the methods independent.
_BUILDERS: dict[str, str] = {
    "baseline": "vvireid.model.baseline:BaselineModel",
    "vld": "vvireid.model.vld:VLD",
    "xreid": "vvireid.model.xreid:XReID",
}


def available_methods() -> list[str]:
    return sorted(_BUILDERS)


def model_class(method: str) -> type[ReIDModel]:
    """The class implementing ``method``. Raises ValueError listing the known methods."""
    if method not in _BUILDERS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(available_methods())}")
    module_name, class_name = _BUILDERS[method].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_model(config: ModelConfig) -> ReIDModel:
    """Instantiate a model from a full config (as stored in checkpoints)."""
    return model_class(config.method)(config)


def create_model(
    method: str,
    num_classes: int,
    *,
    backbone: str = "ViT-B-16",
    pretrained: str | None = None,
    image_size: tuple[int, int] = (288, 144),
    seq_len: int = 6,
    num_cameras: int = 0,
    test_sampling: str = "rrs_test",
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    **options: Any,
) -> ReIDModel:
    """Create a re-ID model; ``pretrained`` is a CLIP weights file or tag (None = random init).

    ``options`` are the method's switches (see each class's ``OPTIONS``); unknown ones are errors.
    """
    cls = model_class(method)
    config = ModelConfig(
        method=method,
        num_classes=num_classes,
        backbone=backbone,
        image_size=tuple(image_size),
        seq_len=seq_len,
        num_cameras=num_cameras,
        test_sampling=test_sampling,
        mean=tuple(mean),
        std=tuple(std),
        options=cls.resolve_options(options),
    )
    model = cls(config)
    if pretrained:
        model.load_pretrained(pretrained)
    return model
