"""Synthetic VVI-ReID datasets written in the real on-disk formats.

Tests, smoke trainings and demos need data with the structure of HITSZ-VCM, BUPTCampus or a
manifest, and a real cross-modality gap, without shipping pictures of people. The people are the
procedural pedestrians of :mod:`vvireid.training.data.pedestrians`; this module plans who is seen by which
camera and writes the files, so that the real readers are exercised.

Each identity appears in both modalities, in several tracklets (1-2 per camera) over 2-3 cameras;
pids ``1..ids//2`` are train identities and the rest test identities. HITSZ-VCM and manifest
tracklets are independent recordings per modality; BUPTCampus tracklets are pixel-aligned RGB/IR
twins, one drawing coloured twice. Output is deterministic for a seed (byte-identical files).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from vvireid.indexer.manifest import write_manifest
from vvireid.indexer.sources.bupt import CAMERAS as BUPT_CAMERAS
from vvireid.model.types import Modality, Tracklet
from vvireid.training.data.pedestrians import (
    Identity,
    Pose,
    camera_background,
    colourise,
    make_identity,
    make_look,
    render_parts,
    seeded_rng,
)

log = logging.getLogger(__name__)

FORMATS = ("hitsz-vcm", "bupt", "manifest")


@dataclass(frozen=True)
class TrackletPlan:
    """One tracklet to draw: who, which camera, how many frames, and where it goes."""

    pid: int
    camid: int
    index: int
    num_frames: int
    split: str
    modalities: tuple[Modality, ...]


def _poses(seed: int, plan: TrackletPlan, ident: Identity, size: tuple[int, int]) -> list[Pose]:
    rng = seeded_rng(seed, "tracklet", plan.pid, plan.camid, plan.index, 0)
    cam_scale = seeded_rng(seed, "camera_scale", plan.camid).uniform(0.85, 1.0)
    height = size[0] * ident.height * cam_scale * rng.uniform(0.94, 1.05)
    cx = size[1] * (0.5 + rng.uniform(-0.1, 0.1))
    drift = rng.uniform(-0.5, 0.5)
    foot = size[0] * rng.uniform(0.95, 0.99)
    phase = rng.uniform(0, 2 * math.pi)
    poses = []
    for i in range(plan.num_frames):
        jitter = rng.uniform(-1, 1, 2)
        poses.append(
            Pose(cx + drift * i + jitter[0], foot + jitter[1], height, phase + ident.speed * i)
        )
    return poses


def render_tracklet(
    seed: int,
    plan: TrackletPlan,
    ident: Identity,
    size: tuple[int, int],
    backgrounds: dict[tuple[int, Modality], np.ndarray],
) -> dict[Modality, list[np.ndarray]]:
    """All frames of a planned tracklet for each of its modalities (pixel-aligned when several).

    ``backgrounds`` caches each camera's scene across tracklets.
    """
    keys = (plan.pid, plan.camid, plan.index)
    looks = {
        m: make_look(
            seeded_rng(seed, "tracklet", *keys, 1 + int(m)),
            seeded_rng(seed, "columns", plan.camid),
            m,
            size,
        )
        for m in plan.modalities
    }
    noise = {m: seeded_rng(seed, "tracklet", *keys, 10 + int(m)) for m in plan.modalities}
    out: dict[Modality, list[np.ndarray]] = {m: [] for m in plan.modalities}
    for pose in _poses(seed, plan, ident, size):
        parts = render_parts(ident, pose, size)
        for m in plan.modalities:
            if (plan.camid, m) not in backgrounds:
                backgrounds[plan.camid, m] = camera_background(seed, plan.camid, m, size)
            scene = backgrounds[plan.camid, m]
            out[m].append(colourise(parts, ident, m, scene, looks[m], noise[m]))
    return out


def _plan_identity(
    rng: np.random.Generator,
    pid: int,
    split: str,
    cameras: int,
    frames: tuple[int, int],
    modalities: tuple[Modality, ...],
    *,
    first_index: int = 0,
    max_cams: int = 3,
) -> list[TrackletPlan]:
    """Tracklets of one identity in one modality set: 2-3 cameras, 1-2 tracklets each.

    Indices start at ``first_index`` so that unpaired visible and infrared tracklets of the same
    camera get different poses (they are different recordings, unlike BUPT's aligned twins).
    """
    count = min(cameras, int(rng.integers(2, max_cams + 1)))
    cams = sorted(int(c) for c in rng.choice(cameras, size=count, replace=False))
    plans = []
    for cam in cams:
        for _ in range(int(rng.integers(1, 3))):
            n = int(rng.integers(frames[0], frames[1] + 1))
            plans.append(TrackletPlan(pid, cam, first_index + len(plans), n, split, modalities))
    if len(plans) < 2:  # a single camera: still give the identity two tracklets
        plans.append(
            TrackletPlan(pid, cams[0], plans[-1].index + 1, plans[-1].num_frames, split, modalities)
        )
    return plans


def _check_args(
    out: Path, fmt: str, ids: int, cameras: int, frames: tuple[int, int], size: tuple[int, int]
) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if ids < 2:
        raise ValueError(f"need at least 2 identities (1 train + 1 test), got {ids}")
    if cameras < 1 or (fmt == "bupt" and cameras > len(BUPT_CAMERAS)):
        raise ValueError(
            f"cameras must be in 1..{len(BUPT_CAMERAS) if fmt == 'bupt' else 'N'}, got {cameras}"
        )
    if not 1 <= frames[0] <= frames[1]:
        raise ValueError(f"frames must be (min, max) with 1 <= min <= max, got {frames}")
    if size[0] < 32 or size[1] < 16:
        raise ValueError(f"image size must be at least 32x16, got {size[0]}x{size[1]}")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: output folder is not empty; choose a new folder")
    if fmt == "hitsz-vcm" and frames[0] < 12:
        log.warning(
            "HITSZ-VCM readers drop tracklets shorter than 12 frames; min frames is %d", frames[0]
        )


def _save(path: Path, frame: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame).save(path, format="JPEG", quality=92)


def synthesize(
    out: str | Path,
    fmt: str,
    *,
    ids: int = 40,
    cameras: int = 4,
    seed: int = 0,
    frames: tuple[int, int] = (12, 16),
    image_size: tuple[int, int] = (128, 64),
    auxiliary_ids: int | None = None,
    vcm_layout: str = "split",
) -> dict[str, Any]:
    """Write a complete synthetic dataset in a real format and return a summary.

    Args:
        out: new or empty folder to write into.
        fmt: ``hitsz-vcm`` (info files + ``Train|Test`` tree, or flat with ``vcm_layout="flat"``),
            ``bupt`` (data_paths.json + list files + DATA/ with aligned RGB/IR pairs) or
            ``manifest`` (manifest.jsonl + ``frames/<pid>/<modality>/<camid>/<tracklet>/``).
        ids: identities; pids 1..ids//2 train, the rest test.
        cameras: cameras per modality (BUPT: at most 6, named as the real ones).
        seed: everything is a function of it.
        frames: (min, max) frames per tracklet, inclusive.
        image_size: (H, W) of the frames.
        auxiliary_ids: BUPT only, identities of ``train_auxiliary.txt`` (default ids // 8, >= 1).
        vcm_layout: ``split`` (``Train/``, ``Test/``) or ``flat``.

    Returns:
        {"format", "out", "ids", "tracklets", "frames", "files"} of what was written.

    Raises:
        ValueError: bad arguments or a non-empty ``out``.
    """
    out = Path(out).expanduser()
    frames = (int(frames[0]), int(frames[1]))
    size = (int(image_size[0]), int(image_size[1]))
    _check_args(out, fmt, ids, cameras, frames, size)
    if vcm_layout not in ("split", "flat"):
        raise ValueError(f"vcm_layout must be 'split' or 'flat', got {vcm_layout!r}")
    out.mkdir(parents=True, exist_ok=True)
    writer = {"hitsz-vcm": _write_vcm, "bupt": _write_bupt, "manifest": _write_manifest}[fmt]
    options = {"vcm_layout": vcm_layout, "auxiliary_ids": auxiliary_ids}
    counts = writer(out, ids=ids, cameras=cameras, seed=seed, frames=frames, size=size, **options)
    summary = {"format": fmt, "out": str(out), "ids": ids, **counts}
    log.info("synthesized %s", summary)
    return summary


def _identity_plans(
    seed: int, ids: int, cameras: int, frames: tuple[int, int], paired: bool
) -> Iterator[tuple[Identity, list[TrackletPlan]]]:
    """Identities in pid order with their tracklets (paired: one plan holds both modalities)."""
    for pid in range(1, ids + 1):
        split = "train" if pid <= ids // 2 else "test"
        rng = seeded_rng(seed, "plan", pid)
        if paired:
            plans = _plan_identity(
                rng, pid, split, cameras, frames, (Modality.VISIBLE, Modality.INFRARED)
            )
        else:
            plans = _plan_identity(rng, pid, split, cameras, frames, (Modality.VISIBLE,))
            plans += _plan_identity(
                rng, pid, split, cameras, frames, (Modality.INFRARED,), first_index=len(plans)
            )
        yield make_identity(seed, pid), plans


def _write_vcm(
    out: Path,
    *,
    ids: int,
    cameras: int,
    seed: int,
    frames: tuple[int, int],
    size: tuple[int, int],
    vcm_layout: str,
    **_: Any,
) -> dict[str, int]:
    names: dict[str, list[str]] = {"train": [], "test": []}
    tracks: dict[str, list[str]] = {"train": [], "test": []}
    query_rows: list[int] = []
    folder_frames: dict[tuple[int, int, int], int] = {}
    backgrounds: dict[tuple[int, Modality], np.ndarray] = {}
    total = 0
    for ident, plans in _identity_plans(seed, ids, cameras, frames, paired=False):
        for t_index, plan in enumerate(plans, start=1):
            modality = plan.modalities[0]
            m = 1 if modality == Modality.INFRARED else 2
            split_dir = (
                {"train": "Train", "test": "Test"}[plan.split] if vcm_layout == "split" else ""
            )
            rendered = render_tracklet(seed, plan, ident, size, backgrounds)[modality]
            start = len(names[plan.split]) + 1
            for image in rendered:
                key = (plan.pid, m, plan.camid)
                folder_frames[key] = folder_frames.get(key, 0) + 1
                name = f"{plan.pid:04d}M{m}D{plan.camid + 1}T{t_index}F{folder_frames[key]}.jpg"
                names[plan.split].append(name)
                folder = out / split_dir / f"{plan.pid:04d}" / ("ir" if m == 1 else "rgb")
                _save(folder / f"D{plan.camid + 1}" / f"{folder_frames[key]}.jpg", image)
            tracks[plan.split].append(
                f"{m} {start} {len(names[plan.split])} {plan.pid:04d} {plan.camid + 1}"
            )
            if plan.split == "test" and m == 1:
                query_rows.append(len(tracks["test"]))
            total += len(rendered)
    info = out / "info"
    info.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (info / f"{split}_name.txt").write_text("".join(n + "\n" for n in names[split]))
        (info / f"track_{split}_info.txt").write_text("".join(t + "\n" for t in tracks[split]))
    (info / "query_IDX.txt").write_text(" ".join(str(r) for r in query_rows) + "\n")
    return {
        "tracklets": len(tracks["train"]) + len(tracks["test"]),
        "frames": total,
        "files": total + 5,
    }


def _write_bupt(
    out: Path,
    *,
    ids: int,
    cameras: int,
    seed: int,
    frames: tuple[int, int],
    size: tuple[int, int],
    auxiliary_ids: int | None,
    **_: Any,
) -> dict[str, int]:
    cam_names = list(BUPT_CAMERAS)[:cameras]
    aux = max(1, ids // 8) if auxiliary_ids is None else auxiliary_ids
    paths: dict[str, dict[str, dict[str, dict[str, list[str]]]]] = {}
    lists: dict[str, list[str]] = {"train": [], "train_auxiliary": [], "query": [], "gallery": []}
    backgrounds: dict[tuple[int, Modality], np.ndarray] = {}
    total = 0

    def write_pair(ident: Identity, plan: TrackletPlan) -> str:
        nonlocal total
        cam, tid = cam_names[plan.camid], str(plan.index + 1)
        first = int(
            seeded_rng(seed, "tracklet", plan.pid, plan.camid, plan.index, 20).integers(1, 9000)
        )
        rendered = render_tracklet(seed, plan, ident, size, backgrounds)
        for modality, token in ((Modality.VISIBLE, "RGB"), (Modality.INFRARED, "IR")):
            rel = [
                f"{plan.pid}/{token}/{cam}/{plan.pid}_{token}_{cam}_{tid}_{first + i}.jpg"
                for i in range(plan.num_frames)
            ]
            paths.setdefault(str(plan.pid), {}).setdefault(token, {}).setdefault(cam, {})[tid] = rel
            for path, image in zip(rel, rendered[modality], strict=True):
                _save(out / "DATA" / path, image)
            total += len(rel)
        return f"{plan.pid} {{}} {cam} {tid}"

    for ident, plans in _identity_plans(seed, ids, cameras, frames, paired=True):
        lines = [write_pair(ident, plan) for plan in plans]
        if plans[0].split == "train":
            lists["train"] += [line.format("RGB/IR") for line in lines]
            continue
        query_token = "IR" if seeded_rng(seed, "split", ident.pid).random() < 0.5 else "RGB"
        lists["query"].append(lines[0].format(query_token))
        lists["gallery"] += [line.format(token) for line in lines[1:] for token in ("RGB", "IR")]
    for pid in range(ids + 1, ids + aux + 1):
        rng = seeded_rng(seed, "plan", pid)
        n = int(rng.integers(frames[0], frames[1] + 1))
        plan = TrackletPlan(
            pid, int(rng.integers(cameras)), 0, n, "train", (Modality.VISIBLE, Modality.INFRARED)
        )
        lists["train_auxiliary"].append(write_pair(make_identity(seed, pid), plan).format("RGB/IR"))
    (out / "data_paths.json").write_text(json.dumps(paths, indent=1, sort_keys=True))
    for name, lines in lists.items():
        (out / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
    pairs = (
        len(lists["train"])
        + len(lists["train_auxiliary"])
        + len(lists["gallery"]) // 2
        + len(lists["query"])
    )
    return {"tracklets": 2 * pairs, "frames": total, "files": total + 5}


def _write_manifest(
    out: Path,
    *,
    ids: int,
    cameras: int,
    seed: int,
    frames: tuple[int, int],
    size: tuple[int, int],
    **_: Any,
) -> dict[str, int]:
    tracklets: list[Tracklet] = []
    backgrounds: dict[tuple[int, Modality], np.ndarray] = {}
    clock = 1_700_000_000.0
    for ident, plans in _identity_plans(seed, ids, cameras, frames, paired=False):
        first_of = set()
        for plan in plans:
            modality = plan.modalities[0]
            split = plan.split
            if split == "test":
                split = "query" if modality not in first_of else "gallery"
                first_of.add(modality)
            tracklet_id = f"{plan.pid:04d}-{modality.label}-c{plan.camid}-{plan.index}"
            folder = out / "frames" / str(plan.pid) / modality.label / str(plan.camid) / tracklet_id
            paths = []
            for i, image in enumerate(
                render_tracklet(seed, plan, ident, size, backgrounds)[modality]
            ):
                _save(folder / f"{i:03d}.jpg", image)
                paths.append(str(folder / f"{i:03d}.jpg"))
            clock += 37.5
            tracklets.append(
                Tracklet(
                    tracklet_id,
                    tuple(paths),
                    modality,
                    plan.camid,
                    plan.pid,
                    clock,
                    {"camera": f"cam{plan.camid}", "split": split},
                )
            )
    write_manifest(out / "manifest.jsonl", tracklets)
    total = sum(len(t) for t in tracklets)
    return {"tracklets": len(tracklets), "frames": total, "files": total + 1}
