"""Train and evaluate on users' own tracklets, described by a manifest (``vvireid.indexer.manifest``).

Each tracklet's ``split`` field says where it goes: ``train`` tracklets (pid required) are the
training set with pids relabelled ``0..C-1`` in ascending order; ``query`` and ``gallery``
tracklets (pid required) form both cross-modal directions by modality (``ir_to_vis``: infrared
queries against the visible gallery; ``vis_to_ir`` the converse). Tracklets without a split are
not used here; they are counted in ``extra['unassigned']`` and logged.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vvireid.indexer.manifest import read_manifest
from vvireid.indexer.sources.splits import (
    DatasetError,
    DatasetSplits,
    cross_modal_directions,
    relabel_map,
)
from vvireid.model.config import model_default
from vvireid.model.types import Tracklet

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"


def _manifest_path(path: Path) -> Path:
    return path / MANIFEST_NAME if path.is_dir() else path


def load_manifest_dataset(
    path: str | Path,
    *,
    filter_same_camera: bool = False,
    test_sampling: str = model_default("test_sampling"),
) -> DatasetSplits:
    """Build train/query/gallery splits from a manifest file (or a folder holding manifest.jsonl).

    Args:
        path: the manifest, or its folder.
        filter_same_camera: evaluate with the VCM rule (drop gallery items with the query's pid and
            camid). Off by default, the BUPTCampus rule; turn it on when the same camera records
            both modalities of a person at once, where same-camera matches are too easy.
        test_sampling: the frame rule for evaluation (``vvireid.model.sampling``); by default the
            model's own default rule (``ModelConfig.test_sampling``).

    Raises:
        ManifestError: malformed manifest lines (all of them).
        DatasetError: tracklets of a split without a pid.
    """
    manifest = _manifest_path(Path(path).expanduser())
    tracklets = read_manifest(manifest)
    groups: dict[str | None, list[Tracklet]] = {"train": [], "query": [], "gallery": [], None: []}
    problems = []
    for t in tracklets:
        split = t.extra.get("split")
        if split is not None and t.pid is None:
            problems.append(f"{t.extra['source']}: pid: required for split {split!r}")
        groups[split].append(t)
    if problems:
        raise DatasetError(problems)
    if groups[None]:
        log.warning("%s: %d tracklets have no split and are not used", manifest, len(groups[None]))

    labels = relabel_map(t.pid for t in groups["train"])
    train = [_relabelled(t, labels[t.pid]) for t in groups["train"]]
    queries, galleries = cross_modal_directions(groups["query"], groups["gallery"])
    return DatasetSplits(
        name="manifest",
        train=train,
        query=queries,
        gallery=galleries,
        num_train_pids=len(labels),
        num_train_cams=max((t.camid for t in tracklets), default=-1) + 1,
        test_sampling=test_sampling,
        filter_same_camera=filter_same_camera,
        train_pairs=None,
        extra={"unassigned": groups[None], "raw_train_pids": sorted(labels), "warnings": []},
    )


def _relabelled(t: Tracklet, pid: int) -> Tracklet:
    extra = dict(t.extra, raw_pid=t.pid)
    return Tracklet(t.tracklet_id, t.frames, t.modality, t.camid, pid, t.timestamp, extra)
