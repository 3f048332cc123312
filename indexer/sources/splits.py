"""What every dataset reader returns: train tracklets and the two query directions.

Readers are pure functions ``load_*(root, **options) -> DatasetSplits``. They never decode images,
so loading a dataset's lists is fast; ``vvireid.training.data.check`` verifies that the frames exist.
Malformed list files raise :class:`DatasetError` carrying *every* problem found, one
``file:line: field: reason`` string each, because a user fixing a hand-edited list wants the whole
list of mistakes at once, not one per run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vvireid.model.types import Direction, Modality, Tracklet

log = logging.getLogger(__name__)

DIRECTIONS = (Direction.IR_TO_VIS, Direction.VIS_TO_IR)


class DatasetError(ValueError):
    """A dataset on disk is malformed. ``problems`` lists every ``file:line: field: reason``."""

    def __init__(self, problems: Sequence[str], *, limit: int = 50) -> None:
        self.problems = list(problems)
        shown = self.problems[:limit]
        more = len(self.problems) - len(shown)
        lines = "\n  ".join(shown) + (f"\n  ... and {more} more" if more > 0 else "")
        super().__init__(f"{len(self.problems)} problem(s) in the dataset:\n  {lines}")


@dataclass
class DatasetSplits:
    """Tracklets of one dataset arranged for training and for both query directions.

    Attributes:
        name: dataset name (``hitsz-vcm``, ``bupt``, ``manifest``).
        train: training tracklets of both modalities, ``pid`` relabelled to ``0..C-1``.
        query: per direction (``ir_to_vis``, ``vis_to_ir``) the query tracklets (raw test pids).
        gallery: per direction the gallery tracklets.
        num_train_pids: C, the number of training identities (classifier width).
        num_train_cams: size of the camera-id space (camids of every split are below it).
        test_sampling: the dataset's official test-time frame rule (``vvireid.model.sampling``).
        filter_same_camera: True when the official protocol removes gallery items with the same
            pid and camid as the query (VCM), False when it removes nothing (BUPTCampus).
        train_pairs: for datasets whose training items are pixel-aligned RGB/IR twins (BUPT),
            ``(visible_index, infrared_index)`` into ``train``; None when modalities are unpaired.
        extra: dataset-specific leftovers (e.g. BUPT's auxiliary training set).
    """

    name: str
    train: list[Tracklet]
    query: dict[str, list[Tracklet]]
    gallery: dict[str, list[Tracklet]]
    num_train_pids: int
    num_train_cams: int
    test_sampling: str
    filter_same_camera: bool
    train_pairs: list[tuple[int, int]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def train_indices(self, modality: Modality) -> list[int]:
        """Positions in ``train`` of the tracklets of one modality (file order)."""
        return [i for i, t in enumerate(self.train) if t.modality == modality]

    def summary(self) -> dict[str, Any]:
        """Counts per split and modality (ids, tracklets, frames, cameras) for reports and logs."""
        parts: dict[str, Any] = {"train": describe(self.train)}
        for direction in DIRECTIONS:
            parts[f"{direction}/query"] = describe(self.query.get(direction, []))
            parts[f"{direction}/gallery"] = describe(self.gallery.get(direction, []))
        return {
            "name": self.name,
            "num_train_pids": self.num_train_pids,
            "num_train_cams": self.num_train_cams,
            "test_sampling": self.test_sampling,
            "filter_same_camera": self.filter_same_camera,
            "train_pairs": None if self.train_pairs is None else len(self.train_pairs),
            "splits": parts,
        }


def read_text(path: Path, problems: list[str]) -> str | None:
    """A dataset file's UTF-8 text, or None with the reason added to ``problems``.

    Readers collect every problem of a dataset before raising one :class:`DatasetError`, so a user
    fixes them all in one pass instead of one per run.
    """
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append(f"{path}: missing file")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{path}: cannot read ({exc})")
    return None


def describe(tracklets: Iterable[Tracklet]) -> dict[str, dict[str, Any]]:
    """Per modality label: number of ids, tracklets and frames, and the sorted camids."""
    out: dict[str, dict[str, Any]] = {}
    for modality in Modality:
        chosen = [t for t in tracklets if t.modality == modality]
        if not chosen:
            continue
        out[modality.label] = {
            "ids": len({t.pid for t in chosen if t.pid is not None}),
            "tracklets": len(chosen),
            "frames": sum(len(t) for t in chosen),
            "cameras": sorted({t.camid for t in chosen}),
        }
    return out


def relabel_map(pids: Iterable[Any]) -> dict[Any, int]:
    """Map raw training ids to ``0..C-1`` in ascending sorted order.

    Sorted order makes the label of an identity reproducible across runs and machines (the official
    VCM code iterates a ``set``, which is ascending for small ints only by CPython accident; the
    official BUPT code sorts the string ids, which we reproduce by passing strings).
    """
    return {pid: label for label, pid in enumerate(sorted(set(pids)))}


def by_modality(tracklets: Iterable[Tracklet], modality: Modality) -> list[Tracklet]:
    """The tracklets of one modality, order kept."""
    return [t for t in tracklets if t.modality == modality]


def cross_modal_directions(
    query: Sequence[Tracklet], gallery: Sequence[Tracklet]
) -> tuple[dict[str, list[Tracklet]], dict[str, list[Tracklet]]]:
    """Split mixed-modality query and gallery lists into the two cross-modal directions.

    ``ir_to_vis``: infrared queries against the visible gallery; ``vis_to_ir`` the converse.
    """
    queries = {
        Direction.IR_TO_VIS: by_modality(query, Modality.INFRARED),
        Direction.VIS_TO_IR: by_modality(query, Modality.VISIBLE),
    }
    galleries = {
        Direction.IR_TO_VIS: by_modality(gallery, Modality.VISIBLE),
        Direction.VIS_TO_IR: by_modality(gallery, Modality.INFRARED),
    }
    return queries, galleries
