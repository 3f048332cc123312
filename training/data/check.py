"""Validate a dataset on disk before training on it (``vvireid-train data check``).

The check reads the lists with the same reader training uses, then verifies that every frame
exists and, with ``deep``, decodes it. It collects every problem (``file:line: field: reason``)
instead of stopping at the first, since fixing a dataset is easier from the full list: readers
that can (``strict=False``) skip the lines they cannot parse and hand over the rest, whose frames
are then examined too. Only a file that cannot be read at all (or a malformed manifest) ends the
check early.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vvireid.indexer.manifest import ManifestError
from vvireid.indexer.sources import DATASETS
from vvireid.indexer.sources.splits import DIRECTIONS, DatasetError, DatasetSplits
from vvireid.model.preprocess import FrameError, load_image
from vvireid.model.types import Tracklet

log = logging.getLogger(__name__)


@dataclass
class CheckReport:
    """Outcome of :func:`check_dataset`: counts, every problem and every warning."""

    format: str
    root: str
    summary: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    frames_checked: int = 0
    decoded: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self, max_problems: int = 0) -> dict[str, Any]:
        """JSON-ready view; ``max_problems`` > 0 truncates the problem and warning lists."""

        def cut(items: list[str]) -> list[str]:
            return items if max_problems <= 0 else items[:max_problems]

        return {
            "ok": self.ok,
            "format": self.format,
            "root": self.root,
            "frames_checked": self.frames_checked,
            "decoded": self.decoded,
            "num_problems": len(self.problems),
            "problems": cut(self.problems),
            "num_warnings": len(self.warnings),
            "warnings": cut(self.warnings),
            "summary": self.summary,
        }


def _all_tracklets(splits: DatasetSplits) -> list[Tracklet]:
    """Every distinct tracklet object the dataset references (both directions share lists)."""
    seen: dict[int, Tracklet] = {}
    groups = [splits.train, splits.extra.get("auxiliary", []), splits.extra.get("unassigned", [])]
    groups += [splits.query.get(d, []) for d in DIRECTIONS] + [
        splits.gallery.get(d, []) for d in DIRECTIONS
    ]
    for group in groups:
        for t in group:
            seen.setdefault(id(t), t)
    return list(seen.values())


def _frame_where(t: Tracklet, i: int) -> str:
    """Where a frame is listed: the names-file line for VCM, else the tracklet's line."""
    if "names_file" in t.extra:
        return f"{t.extra['names_file']}:{t.extra['first_name_line'] + i}"
    return f"{t.extra.get('source', t.tracklet_id)} (frame {i})"


def _frames(tracklets: list[Tracklet]) -> Iterator[tuple[str, str]]:
    """(where, path) of every distinct frame path."""
    seen: set[str] = set()
    for t in tracklets:
        for i, path in enumerate(t.frames):
            if path not in seen:
                seen.add(path)
                yield _frame_where(t, i), path


def _decode_problem(item: tuple[str, str]) -> str | None:
    where, path = item
    try:
        load_image(path)
    except FrameError as exc:
        return f"{where}: frame: {path}: {exc.reason}"
    return None


def check_dataset(
    fmt: str, root: str | Path, *, deep: bool = False, workers: int | None = None, **options: Any
) -> CheckReport:
    """Read a dataset, check its frames exist (and decode with ``deep``), and report everything.

    Args:
        fmt: ``hitsz-vcm``, ``bupt`` or ``manifest``.
        root: the dataset folder (manifest: the .jsonl file or its folder).
        deep: also decode every frame (slow: all images are read).
        workers: decoding threads (default: CPU count).
        **options: passed to the reader (e.g. ``min_seq_len``, ``drop_last_rgb_batch``).
    """
    report = CheckReport(format=fmt, root=str(root))
    if fmt not in DATASETS:
        report.problems.append(
            f"format: unknown dataset format {fmt!r}; known: {', '.join(DATASETS)}"
        )
        return report
    reader = DATASETS[fmt]
    if "strict" in inspect.signature(reader).parameters:
        options = {**options, "strict": False}
    try:
        splits = reader(root, **options)
    except (DatasetError, ManifestError) as exc:
        report.problems += exc.problems
        return report
    report.problems += splits.extra.get("problems", [])
    report.warnings += splits.extra.get("warnings", [])
    report.summary = splits.summary()
    if "auxiliary" in splits.extra:
        report.summary["auxiliary_tracklets"] = len(splits.extra["auxiliary"])
    if "unassigned" in splits.extra:
        report.summary["unassigned_tracklets"] = len(splits.extra["unassigned"])
    frames = list(_frames(_all_tracklets(splits)))
    report.frames_checked = len(frames)
    existing = []
    for where, path in frames:
        if os.path.isfile(path):
            existing.append((where, path))
        else:
            report.problems.append(f"{where}: frame: {path} does not exist")
    if deep:
        report.decoded = True
        log.info("decoding %d frames", len(existing))
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            report.problems += [p for p in pool.map(_decode_problem, existing) if p]
    return report
