"""Checkpoints: exact round trip, fingerprint, clear errors, and no pickle anywhere."""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from vvireid.model.checkpoint import (
    CheckpointError,
    fingerprint,
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
)
from vvireid.model.config import ModelConfig
from vvireid.model.factory import create_model

SEQ_LEN = 4


def trained_model(method: str, tiny_kwargs: dict[str, Any], make_clips: Callable, **options: Any):
    """A model whose every trainable tensor (BN statistics too) differs from a fresh build."""
    model = create_model(ModelConfig(method, 3, seq_len=SEQ_LEN, **tiny_kwargs, options=options))
    model.train()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
        model(make_clips(4))  # moves the BN running statistics
    return model


@pytest.mark.parametrize(
    ("method", "options"),
    [("vld", {}), ("vld", {"use_sth": False, "sth_start_layer": 2}), ("baseline", {})],
)
def test_round_trip_gives_identical_features_and_fingerprint(
    method: str,
    options: dict[str, Any],
    tiny_kwargs: dict[str, Any],
    make_clips: Callable,
    tmp_path: Path,
) -> None:
    model = trained_model(method, tiny_kwargs, make_clips, **options)
    path = tmp_path / "model.safetensors"
    saved_fp = save_checkpoint(path, model, extra={"epoch": 3})
    loaded = load_checkpoint(path)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config == model.config
    assert loaded.fingerprint == saved_fp == model.fingerprint
    assert fingerprint(loaded.config, loaded.state_dict()) == saved_fp
    clips = make_clips(3)
    torch.testing.assert_close(loaded.encode(clips), model.encode(clips), atol=0, rtol=0)
    assert read_checkpoint_metadata(path)["extra"] == {"epoch": 3}


def test_vld_prompts_survive_the_round_trip(
    tiny_kwargs: dict[str, Any], make_clips: Callable, tmp_path: Path
) -> None:
    model = trained_model("vld", tiny_kwargs, make_clips)
    save_checkpoint(tmp_path / "vld.safetensors", model)
    loaded = load_checkpoint(tmp_path / "vld.safetensors")
    with torch.no_grad():
        before = model.prompts(model.backbone.text)
        after = loaded.prompts(loaded.backbone.text)
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_fingerprint_changes_with_the_weights(
    tiny_kwargs: dict[str, Any], make_clips: Callable, tmp_path: Path
) -> None:
    model = trained_model("baseline", tiny_kwargs, make_clips)
    first = save_checkpoint(tmp_path / "a.safetensors", model)
    with torch.no_grad():
        model.backbone.visual.proj.add_(1e-3)
    assert save_checkpoint(tmp_path / "b.safetensors", model) != first


def test_unknown_format_version_raises_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "future.safetensors"
    metadata = {"format": "vvireid.checkpoint", "format_version": "99", "config": "{}"}
    save_file({"w": torch.zeros(1)}, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"future\.safetensors.*version '99'"):
        load_checkpoint(path)


def test_foreign_safetensors_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "clip.safetensors"
    save_file({"visual.proj": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError, match=r"clip\.safetensors.*not a vvireid checkpoint"):
        load_checkpoint(path)


def test_truncated_checkpoint_raises_naming_the_file(
    tiny_kwargs: dict[str, Any], make_clips: Callable, tmp_path: Path
) -> None:
    path = tmp_path / "cut.safetensors"
    save_checkpoint(path, trained_model("baseline", tiny_kwargs, make_clips))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors"):
        load_checkpoint(path)


def test_missing_checkpoint_raises_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nowhere\.safetensors"):
        load_checkpoint(tmp_path / "nowhere.safetensors")


def test_checkpoint_is_plain_safetensors_and_loads_without_pickle(
    tiny_kwargs: dict[str, Any],
    make_clips: Callable,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "vld.safetensors"
    model = trained_model("vld", tiny_kwargs, make_clips)
    save_checkpoint(path, model)
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "vvireid.checkpoint"
    assert set(header) - {"__metadata__"} == set(model.state_dict())

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    loaded = load_checkpoint(path)
    clips = make_clips(2)
    torch.testing.assert_close(loaded.encode(clips), model.encode(clips), atol=0, rtol=0)


def test_weights_of_another_model_raise(
    tiny_kwargs: dict[str, Any], make_clips: Callable, tmp_path: Path
) -> None:
    """A checkpoint whose tensors do not match its own config is rejected, listing the keys."""
    path = tmp_path / "mixed.safetensors"
    vld = trained_model("vld", tiny_kwargs, make_clips)
    save_checkpoint(path, vld)
    metadata = read_checkpoint_metadata(path)
    baseline = trained_model("baseline", tiny_kwargs, make_clips)
    state = {k: v.contiguous() for k, v in baseline.state_dict().items()}
    raw_meta = {
        "format": "vvireid.checkpoint",
        "format_version": "1",
        "config": json.dumps(metadata["config"]),
        "fingerprint": metadata["fingerprint"],
        "extra": "{}",
    }
    save_file(state, str(path), metadata=raw_meta)
    expected = r"mixed\.safetensors.*do not match the vld model.*missing: \[.backbone"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)
