"""The one place a device name (``auto``, ``cpu``, ``cuda``, ``cuda:N``) becomes a ``torch.device``.

The indexer, the server, evaluation and the trainer all take a device name from a user; one
resolver keeps their meaning the same everywhere and fails early, naming the device, when a GPU
is asked for on a machine that has none (rather than deep inside the first ``.to(device)``).
"""

from __future__ import annotations

import torch

DEVICE_CHOICES = "auto, cpu or cuda[:N]"


def resolve_device(device: str | torch.device = "auto", *, local_rank: int | None = None) -> torch.device:
    """``auto`` -> CUDA when torch sees a GPU, else CPU; ``cpu``, ``cuda`` and ``cuda:N`` as named.

    Args:
        device: a device name or a ``torch.device`` (returned as is once checked).
        local_rank: the process's rank on its machine under ``torchrun``. When given, an
            unnumbered CUDA device (``auto`` or ``cuda``) becomes ``cuda:<local_rank mod GPUs>``,
            so each process of a data-parallel run gets its own GPU. Without it the plain
            ``cuda`` device (the current one) is returned.

    Raises:
        ValueError: an unknown or unsupported device, or CUDA asked for but not available.
    """
    if isinstance(device, str) and device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = "cuda"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use {DEVICE_CHOICES}") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use {DEVICE_CHOICES}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested, but torch sees no CUDA GPU")
    if resolved.type == "cuda" and resolved.index is None and local_rank is not None:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return resolved
