"""BUPTCampus reader (Du et al., "Video-based Visible-Infrared Person Re-Identification with
Auxiliary Samples", IEEE TIFS 2023/24; https://github.com/dyhBUPT/BUPTCampus).

3,080 identities, 6 dual-mode cameras each recording pixel-aligned RGB and IR tracklets
(1,074 primary train ids, 930 auxiliary ids, 1,076 test ids). [3rd-party counts]: train.txt 3,574
pairs; query.txt 536 IR + 540 RGB; gallery.txt 2,422 IR + 2,422 RGB.

Layout::

    <root>/data_paths.json      {pid: {"RGB"|"IR": {camera: {tracklet_id: [paths under DATA/]}}}}
    <root>/train.txt            "pid RGB/IR camera tracklet_id": one aligned RGB+IR pair per line
    <root>/train_auxiliary.txt  same format; optional, parsed into ``extra['auxiliary']``
    <root>/query.txt            "pid RGB|IR camera tracklet_id"
    <root>/gallery.txt
    <root>/DATA/<pid>/<RGB|IR>/<camera>/<frames>

``root`` may also be the ``DATA`` folder itself (the official ``--data_root``). Cameras map to
camids as the official code does: ``{LS3: 0, G25: 1, CQ1: 2, W4: 3, TSG1: 4, TSG2: 5}``; any other
camera name is reported as an error (the camid space of trained checkpoints must not shift).

Protocol (the official BUPTCampus code; docs/fidelity.md D7-D11): ``ir_to_vis`` = IR lines of query.txt
against RGB lines of gallery.txt, ``vis_to_ir`` = RGB queries against IR gallery; no camera filter;
test pids are ``int(pid)``; train labels come from the *string* ids sorted lexicographically, as in
the official code. Every tracklet is kept, including 1-frame ones (X-ReID drops those; the official
code does not).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vvireid.indexer.sources.splits import (
    DatasetError,
    DatasetSplits,
    cross_modal_directions,
    read_text,
    relabel_map,
)
from vvireid.model.types import Modality, Tracklet

log = logging.getLogger(__name__)

CAMERAS = {"LS3": 0, "G25": 1, "CQ1": 2, "W4": 3, "TSG1": 4, "TSG2": 5}
PAIR_TOKEN = "RGB/IR"
MODALITY_TOKENS = {"RGB": Modality.VISIBLE, "IR": Modality.INFRARED}
OFFICIAL_TEST_BATCH = 64


def _find_root(root: Path) -> Path:
    if (
        root.name == "DATA"
        and not (root / "data_paths.json").exists()
        and (root.parent / "data_paths.json").exists()
    ):
        return root.parent
    return root


def _load_paths(path: Path, problems: list[str]) -> dict[str, Any] | None:
    text = read_text(path, problems)
    if text is None:
        return None
    try:
        paths = json.loads(text)
    except json.JSONDecodeError as exc:
        problems.append(f"{path}:{exc.lineno}: json: {exc.msg}")
        return None
    if not isinstance(paths, dict):
        problems.append(f"{path}: json: top level must be an object {{pid: {{modality: ...}}}}")
        return None
    return paths


class _ListReader:
    """Parses the ``pid modality camera tracklet_id`` list files against ``data_paths.json``."""

    def __init__(
        self, root: Path, paths: dict[str, Any], problems: list[str], warnings: list[str]
    ) -> None:
        self.root, self.paths = root, paths
        self.problems, self.warnings = problems, warnings

    def read(
        self, name: str, tokens: tuple[str, ...], *, required: bool = True
    ) -> list[tuple[str, list[str]]]:
        """Valid lines of one list file as (where, fields); problems recorded for the rest."""
        path = self.root / name
        if not path.exists():
            if required:
                self.problems.append(f"{path}: missing file")
            return []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            self.problems.append(f"{path}: cannot read ({exc})")
            return []
        out, seen = [], {}
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            fields = line.split()
            if self._valid(where, fields, tokens):
                key = tuple(fields)
                if key in seen:
                    self.warnings.append(f"{where}: line: repeats line {seen[key]}")
                seen.setdefault(key, number)
                out.append((where, fields))
        return out

    def _valid(self, where: str, fields: list[str], tokens: tuple[str, ...]) -> bool:
        if len(fields) != 4:
            self.problems.append(
                f"{where}: line: expected 'pid modality camera tracklet_id', "
                f"got {' '.join(fields)!r}"
            )
            return False
        pid, modality, camera, _ = fields
        ok = True
        if not pid.isdigit():
            self.problems.append(f"{where}: pid: {pid!r} is not a non-negative integer")
            ok = False
        if modality not in tokens:
            self.problems.append(f"{where}: modality: {modality!r}; expected {' or '.join(tokens)}")
            ok = False
        if camera not in CAMERAS:
            self.problems.append(
                f"{where}: camera: unknown camera {camera!r}; known: {', '.join(CAMERAS)}"
            )
            ok = False
        return ok

    def frames(
        self, where: str, pid: str, modality: str, camera: str, tid: str
    ) -> tuple[str, ...] | None:
        """Absolute frame paths of one tracklet from data_paths.json, or None (problem recorded)."""
        node: Any = self.paths
        for key in (pid, modality, camera, tid):
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                self.problems.append(
                    f"{where}: tracklet: {pid}/{modality}/{camera}/{tid} is not in "
                    f"data_paths.json (missing key {key!r})"
                )
                return None
        if (
            not isinstance(node, list)
            or not node
            or not all(isinstance(p, str) and p for p in node)
        ):
            self.problems.append(
                f"{where}: tracklet: data_paths.json[{pid}][{modality}][{camera}][{tid}] "
                "must be a non-empty list of paths"
            )
            return None
        return tuple(str(self.root / "DATA" / p) for p in node)


def _tracklet(
    where: str, fields: list[str], modality: str, frames: tuple[str, ...], pid: int
) -> Tracklet:
    raw_pid, _, camera, tid = fields
    return Tracklet(
        tracklet_id=f"{raw_pid}_{modality}_{camera}_{tid}",
        frames=frames,
        modality=MODALITY_TOKENS[modality],
        camid=CAMERAS[camera],
        pid=pid,
        extra={"source": where, "camera": camera, "raw_pid": raw_pid},
    )


def _pairs(
    reader: _ListReader, lines: list[tuple[str, list[str]]], labels: dict[str, int] | None
) -> list[Tracklet]:
    """RGB, IR, RGB, IR, ... tracklets of aligned pair lines (labels None keeps int pids)."""
    out = []
    for where, fields in lines:
        pid, _, camera, tid = fields
        rgb = reader.frames(where, pid, "RGB", camera, tid)
        ir = reader.frames(where, pid, "IR", camera, tid)
        if rgb is None or ir is None:
            continue
        if len(rgb) != len(ir):
            reader.warnings.append(
                f"{where}: tracklet: RGB has {len(rgb)} frames, IR {len(ir)}; "
                "aligned sampling uses the shorter"
            )
        label = int(pid) if labels is None else labels[pid]
        out += [
            _tracklet(where, fields, "RGB", rgb, label),
            _tracklet(where, fields, "IR", ir, label),
        ]
    return out


def _singles(reader: _ListReader, lines: list[tuple[str, list[str]]]) -> list[Tracklet]:
    out = []
    for where, fields in lines:
        frames = reader.frames(where, *fields)
        if frames is not None:
            out.append(_tracklet(where, fields, fields[1], frames, int(fields[0])))
    return out


def official_rgb_drop(
    tracklets: list[Tracklet], batch: int = OFFICIAL_TEST_BATCH
) -> list[Tracklet]:
    """Reproduce the official test sampler: drop the last ``len(RGB) % batch`` RGB tracklets.

    The official ``ConsistentModalitySampler`` slices ``rgb[:-(len(rgb) % 64)]``, which for a
    remainder of 0 would drop *every* RGB tracklet; we drop none in that case (the evident intent).
    IR tracklets and the file order are kept.
    """
    rgb = [t for t in tracklets if t.modality == Modality.VISIBLE]
    dropped = {id(t) for t in rgb[len(rgb) - len(rgb) % batch :]}
    return [t for t in tracklets if id(t) not in dropped]


def load_buptcampus(
    root: str | Path, *, drop_last_rgb_batch: bool = False, strict: bool = True
) -> DatasetSplits:
    """Read BUPTCampus from ``root`` (the folder holding data_paths.json, or its DATA folder).

    Args:
        root: dataset folder.
        drop_last_rgb_batch: reproduce the official test loader, which silently drops the last
            ``len(RGB) % 64`` RGB tracklets of query.txt and of gallery.txt (28 and 54 on the real
            data). Off by default: every listed tracklet is evaluated (as X-ReID does).
        strict: raise on any problem. False keeps what parses, skips the rest and lists every
            problem in ``extra['problems']`` (``data check`` then examines the remaining frames).

    Raises:
        DatasetError: listing every missing file, malformed line and unknown tracklet (with
            ``strict=False`` only when data_paths.json is unusable).
    """
    root = _find_root(Path(root).expanduser().resolve())
    problems: list[str] = []
    warnings: list[str] = []
    paths = _load_paths(root / "data_paths.json", problems)
    if paths is None:
        raise DatasetError(problems)
    reader = _ListReader(root, paths, problems, warnings)
    train_lines = reader.read("train.txt", (PAIR_TOKEN,))
    aux_lines = reader.read("train_auxiliary.txt", (PAIR_TOKEN,), required=False)
    query_lines = reader.read("query.txt", tuple(MODALITY_TOKENS))
    gallery_lines = reader.read("gallery.txt", tuple(MODALITY_TOKENS))
    labels = relabel_map(fields[0] for _, fields in train_lines)
    train = _pairs(reader, train_lines, labels)
    auxiliary = _pairs(reader, aux_lines, None)
    query, gallery = _singles(reader, query_lines), _singles(reader, gallery_lines)
    if problems and strict:
        raise DatasetError(problems)
    splits = _assemble(train, auxiliary, query, gallery, labels, drop_last_rgb_batch, warnings)
    splits.extra["problems"] = problems
    return splits


def _assemble(
    train: list[Tracklet],
    auxiliary: list[Tracklet],
    query: list[Tracklet],
    gallery: list[Tracklet],
    labels: dict[str, int],
    drop_rgb: bool,
    warnings: list[str],
) -> DatasetSplits:
    if drop_rgb:
        before = (len(query), len(gallery))
        query, gallery = official_rgb_drop(query), official_rgb_drop(gallery)
        log.info(
            "BUPTCampus: official RGB drop removed %d query and %d gallery RGB tracklets",
            before[0] - len(query),
            before[1] - len(gallery),
        )
    queries, galleries = cross_modal_directions(query, gallery)
    log.info(
        "BUPTCampus: %d train pairs (%d ids), query %d, gallery %d, auxiliary pairs %d",
        len(train) // 2,
        len(labels),
        len(query),
        len(gallery),
        len(auxiliary) // 2,
    )
    if warnings:
        log.warning("BUPTCampus: %d warnings, first: %s", len(warnings), warnings[0])
    return DatasetSplits(
        name="bupt",
        train=train,
        query=queries,
        gallery=galleries,
        num_train_pids=len(labels),
        num_train_cams=len(CAMERAS),
        test_sampling="uniform",
        filter_same_camera=False,
        train_pairs=[(i, i + 1) for i in range(0, len(train), 2)],
        extra={
            "warnings": warnings,
            "auxiliary": auxiliary,
            "auxiliary_pairs": [(i, i + 1) for i in range(0, len(auxiliary), 2)],
            "raw_train_pids": sorted(labels),
            "drop_last_rgb_batch": drop_rgb,
        },
    )
