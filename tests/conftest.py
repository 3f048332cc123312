"""Fixtures shared by every test: the tiny CLIP config, small images, seeded and single-threaded.

Tests build models with ``create_model(ModelConfig(method, num_classes, seq_len=..., **tiny_kwargs))``:
a 4-block, 64-wide ViT at 64x32 pixels (a 4x2 patch grid) with random weights: no downloads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from vvireid.model.backbone import TINY_MODEL, register_tiny_configs

TINY_IMAGE_SIZE = (64, 32)

# Tiny models on a shared 2-core machine: extra intra-op threads only contend (10-100x slower).
torch.set_num_threads(1)
register_tiny_configs()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _drop_cli_log_handlers() -> Iterator[None]:
    """Remove the stderr/file handlers a command's ``main()`` adds when a test calls it in-process.

    A command configures logging once per process; called from a test, its handler would keep
    pointing at that test's captured (then closed) stderr and break later tests' output checks.
    """
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in before and type(handler) in (logging.StreamHandler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.fixture
def tiny_kwargs() -> dict[str, Any]:
    """``ModelConfig`` fields for the tiny backbone at 64x32."""
    return {"backbone": TINY_MODEL, "image_size": TINY_IMAGE_SIZE}


@pytest.fixture
def make_clips() -> Callable[..., torch.Tensor]:
    """``make_clips(batch, seq_len=4)`` -> random normalised clips [B, T, 3, 64, 32]."""

    def make(batch: int, seq_len: int = 4) -> torch.Tensor:
        return torch.randn(batch, seq_len, 3, *TINY_IMAGE_SIZE)

    return make
