"""Model construction: one table from method name to class."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from vvireid.model.base import ReIDModel
from vvireid.model.config import ModelConfig

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


def create_model(config: ModelConfig, *, pretrained: str | None = None, **overrides: Any) -> ReIDModel:
    """Create the re-ID model ``config`` describes, with its method's option defaults filled in.

    ``overrides`` replace fields of ``config`` by name (``create_model(cfg, num_classes=500)``), so
    a caller states only what differs and every default stays in :class:`ModelConfig`.
    ``config.options`` are the method's switches (see each class's ``OPTIONS``); unknown ones are
    errors. ``pretrained`` is a CLIP weights file or open_clip tag (None = random init).

    Raises:
        ValueError: an unknown method, override or option (named in the message).
    """
    unknown = sorted(set(overrides) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        known = ", ".join(ModelConfig.__dataclass_fields__)
        raise ValueError(f"unknown model config field(s): {', '.join(unknown)} (known: {known})")
    config = dataclasses.replace(config, **overrides) if overrides else config
    cls = model_class(config.method)
    model = cls(dataclasses.replace(config, options=cls.resolve_options(config.options)))
    if pretrained:
        model.load_pretrained(pretrained)
    return model
