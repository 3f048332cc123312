"""Synthetic datasets shared by the training tests: each built once per session, by name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from vvireid.training.data.synth import synthesize


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Callable[..., Path]:
    """``synth_dataset(name, **synthesize_kwargs)`` -> the dataset's root, written on first use."""

    def build(name: str, **kw) -> Path:
        root = tmp_path_factory.getbasetemp() / f"synth-{name}"
        if not (root / ".done").exists():
            synthesize(root, **kw)
            (root / ".done").write_text("ok")
        return root

    return build


@pytest.fixture(scope="session")
def vcm(synth_dataset) -> Path:
    """A small HITSZ-VCM tree: 8 identities (4 train, 4 test), 2 cameras, 64x32 frames."""
    return synth_dataset("vcm-small", fmt="hitsz-vcm", ids=8, cameras=2, seed=3,
                         frames=(12, 13), image_size=(64, 32))
