"""Tracklet sources: the published datasets' readers and users' manifests, as protocol splits.

They live in the indexer layer because both the index builder and the trainer read them; the
trainer adds samplers, clip datasets and augmentation on top (``vvireid.training.data``).
Readers are plain functions returning :class:`~vvireid.indexer.sources.splits.DatasetSplits`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vvireid.indexer.sources.bupt import load_buptcampus
from vvireid.indexer.sources.manifest_dataset import load_manifest_dataset
from vvireid.indexer.sources.splits import DatasetError, DatasetSplits
from vvireid.indexer.sources.vcm import load_hitsz_vcm

DATASETS: dict[str, Callable[..., DatasetSplits]] = {
    "hitsz-vcm": load_hitsz_vcm,
    "bupt": load_buptcampus,
    "manifest": load_manifest_dataset,
}


def load_dataset(fmt: str, root: str | Path, **options: Any) -> DatasetSplits:
    """Load a dataset by format name (``hitsz-vcm``, ``bupt``, ``manifest``).

    Raises:
        ValueError: for an unknown format, listing the known ones.
    """
    if fmt not in DATASETS:
        raise ValueError(f"unknown dataset format {fmt!r}; known: {', '.join(DATASETS)}")
    return DATASETS[fmt](root, **options)


__all__ = ["DATASETS", "DatasetError", "DatasetSplits", "load_dataset"]
