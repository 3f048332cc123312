"""Dataset readers, the synthetic generator, samplers, clip datasets and augmentation.

Readers are plain functions returning :class:`~training.data.splits.DatasetSplits`; this module
only names them. Torch-dependent parts (samplers, clip datasets, transforms) are imported from
their own submodules so that reading lists stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vvireid.training.data.bupt import load_buptcampus
from vvireid.training.data.manifest_dataset import load_manifest_dataset
from vvireid.training.data.splits import DatasetError, DatasetSplits
from vvireid.training.data.vcm import load_hitsz_vcm

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
