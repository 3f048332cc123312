"""Fixtures of the indexer tests: synthetic frames on disk, a manifest and a tiny checkpoint.

Frames are random-noise JPEGs written with PIL into ``tmp_path`` (each tracklet its own base colour,
so tracklets differ); the model is the tiny baseline at 64x32 with random weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from vvireid.model.checkpoint import save_checkpoint
from vvireid.model.config import ModelConfig
from vvireid.model.factory import create_model


def write_tracklet(folder: Path, rng: np.random.Generator, num_frames: int = 5) -> list[str]:
    """Write ``num_frames`` 40x20 JPEG frames into ``folder``; returns their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 256, size=3)
    names = []
    for f in range(num_frames):
        noise = rng.integers(-40, 40, size=(40, 20, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{f}.jpg", quality=90)
        names.append(f"{f}.jpg")
    return names


@pytest.fixture
def frames_of(tmp_path: Path) -> Callable[[str, int, int], list[str]]:
    """``frames_of(name, n, seed)`` -> absolute paths of ``n`` new frames in ``tmp_path/name``."""

    def make(name: str, n: int, seed: int) -> list[str]:
        folder = tmp_path / name
        return [str(folder / f) for f in write_tracklet(folder, np.random.default_rng(seed), n)]

    return make


@pytest.fixture
def make_gallery(tmp_path: Path) -> Callable[..., Path]:
    """``make_gallery(n, name="gallery", start=0)`` -> manifest path of ``n`` tracklets.

    Tracklet ``t{i}`` is visible for even i, infrared for odd i, camera ``i % 3``, pid ``i // 2``.
    """

    def make(n: int, name: str = "gallery", start: int = 0, seed: int = 0) -> Path:
        root = tmp_path / name
        rng = np.random.default_rng(seed)
        records = []
        for i in range(start, start + n):
            frames = write_tracklet(root / f"t{i}", rng)
            records.append(
                {
                    "tracklet_id": f"t{i}",
                    "modality": "visible" if i % 2 == 0 else "infrared",
                    "camid": i % 3,
                    "camera": f"cam-{i % 3}",
                    "frames": [f"t{i}/{f}" for f in frames],
                    "pid": i // 2,
                }
            )
        manifest = root / "gallery.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
        return manifest

    return make


@pytest.fixture
def checkpoint(tmp_path: Path, tiny_kwargs: dict[str, Any]) -> Callable[..., Path]:
    """``checkpoint(method="baseline", seed=0)`` -> path of a saved tiny model (seq_len 4)."""
    import torch

    def make(method: str = "baseline", seed: int = 0, **options: Any) -> Path:
        torch.manual_seed(seed)
        model = create_model(ModelConfig(method, 5, seq_len=4, **tiny_kwargs, options=options))
        path = tmp_path / f"{method}-{seed}.safetensors"
        save_checkpoint(path, model)
        return path

    return make
