"""Shared vocabulary of vvireid: modalities, tracklets and query directions.

Shape letters used in docstrings across the project:
``B`` tracklets (clips) in a batch, ``T`` frames per clip (the sequence length), ``N`` tokens per
frame, ``D`` feature width. ``clips`` are ``[B, T, 3, H, W]``, ``frames`` are ``[B*T, 3, H, W]``
in tracklet-major order (all frames of clip 0, then clip 1, ...), ``feats`` are ``[B, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

_MODALITY_ALIASES = {
    "visible": 0,
    "vis": 0,
    "rgb": 0,
    "v": 0,
    "infrared": 1,
    "ir": 1,
    "thermal": 1,
    "i": 1,
}


class Modality(IntEnum):
    """Camera modality of a tracklet. Day cameras are VISIBLE (RGB), night cameras INFRARED."""

    VISIBLE = 0
    INFRARED = 1

    @classmethod
    def parse(cls, value: str | int | Modality) -> Modality:
        """Accept the spellings users and datasets use (``visible``/``rgb``, ``infrared``/``ir``, 0/1).

        Raises:
            ValueError: naming the value and the accepted spellings.
        """
        if isinstance(value, Modality):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
            return cls(value)
        if isinstance(value, str) and value.strip().lower() in _MODALITY_ALIASES:
            return cls(_MODALITY_ALIASES[value.strip().lower()])
        raise ValueError(
            f"unknown modality {value!r}: use 'visible' (or rgb, 0) or 'infrared' (or ir, 1)"
        )

    @property
    def label(self) -> str:
        """The lower-case name used in files, JSON and the HTTP API."""
        return self.name.lower()

    @property
    def other(self) -> Modality:
        """The opposite modality: what a cross-modal query searches."""
        return Modality.INFRARED if self is Modality.VISIBLE else Modality.VISIBLE


class Direction(str):
    """Query directions of the VVI-ReID protocols."""

    IR_TO_VIS = "ir_to_vis"
    VIS_TO_IR = "vis_to_ir"


@dataclass(frozen=True)
class Tracklet:
    """One tracklet: the ordered frames of one person seen by one camera.

    ``pid`` is None for unlabelled gallery items; ``camid`` is a 0-based camera index.
    """

    tracklet_id: str
    frames: tuple[str, ...]
    modality: Modality
    camid: int
    pid: int | None = None
    timestamp: float | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __len__(self) -> int:
        return len(self.frames)
