"""Model checkpoints: one safetensors file holding the weights, the config and the preprocessing.

Why safetensors with JSON metadata rather than ``torch.save``: loading a checkpoint never unpickles
arbitrary objects, and the indexer and the server can rebuild the exact model from the file alone.
Training state (optimiser, scheduler, RNG) lives in separate resume files written by the trainer.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from vvireid.model.base import ReIDModel
from vvireid.model.config import ModelConfig
from vvireid.model.fileio import write_atomic

log = logging.getLogger(__name__)

FORMAT = "vvireid.checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the reason."""


def fingerprint(config: ModelConfig, state: dict[str, torch.Tensor]) -> str:
    """A short content hash of config + weights: indexes record it to refuse another model."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous().reshape(-1)
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_checkpoint(path: str | Path, model: ReIDModel, extra: dict[str, Any] | None = None) -> str:
    """Write ``model`` atomically; returns its fingerprint. ``extra`` is JSON metadata (metrics...)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    fp = fingerprint(model.config, state)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(model.config.to_dict()),
        "fingerprint": fp,
        "extra": json.dumps(extra or {}),
    }
    write_atomic(Path(path), lambda tmp: save_file(state, tmp, metadata=metadata))
    model.fingerprint = fp
    log.info("saved checkpoint %s (fingerprint %s)", path, fp)
    return fp


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's header: format, version, config (dict), fingerprint, extra (dict)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable vvireid checkpoint ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a vvireid checkpoint (format {meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('format_version')!r} is not supported "
            f"(this vvireid reads version {FORMAT_VERSION})"
        )
    try:
        return {
            "config": json.loads(meta["config"]),
            "fingerprint": meta["fingerprint"],
            "extra": json.loads(meta.get("extra", "{}")),
        }
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint header ({exc})") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> ReIDModel:
    """Rebuild the exact model stored in ``path``, in eval mode, with ``.fingerprint`` set.

    Raises:
        CheckpointError: unknown format or version, corrupt file, or weights that do not fit.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from vvireid.model.factory import build_model

    meta = read_checkpoint_metadata(path)
    try:
        config = ModelConfig.from_dict(meta["config"])
        model = build_model(config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild the model ({exc})") from None
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({exc})") from None
    missing, unexpected = _key_diff(model.state_dict(), state)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the {config.method} model "
            f"(missing: {missing[:8]}, unexpected: {unexpected[:8]})"
        )
    model.load_state_dict(state, strict=True)
    model.to(map_location).eval()
    model.fingerprint = meta["fingerprint"]
    return model


def _key_diff(expected: dict[str, Any], found: dict[str, Any]) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
