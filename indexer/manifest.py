"""The tracklet manifest: how users hand their own tracklets to training and to the indexer.

A manifest is a JSONL file, one tracklet per line::

    {"tracklet_id": "cam3-0042", "modality": "infrared", "camid": 3, "camera": "gate (night)",
     "frames": ["frames/cam3-0042/000.jpg", "frames/cam3-0042/001.jpg"],
     "pid": 17, "timestamp": 1718035200.5, "split": "gallery", "meta": {"site": "north"}}

=============  ========  ==============================================================
field          required  meaning
=============  ========  ==============================================================
tracklet_id    yes       non-empty string, unique in the file
modality       yes       ``visible`` or ``infrared`` (``Modality.parse`` spellings: rgb, ir, 0, 1)
camid          yes       integer >= 0, the camera index the model's camera embedding sees
camera         no        display name of the camera
frames         yes       non-empty list of image paths in temporal order; relative paths are
                         relative to the manifest's folder
pid            no        integer >= 0 identity (needed for training and evaluation)
timestamp      no        number, e.g. seconds since the epoch of the first frame
split          no        ``train``, ``query`` or ``gallery`` (used by ``load_manifest_dataset``)
meta           no        JSON object kept verbatim for the user's own metadata
=============  ========  ==============================================================

Blank lines are ignored. Unknown fields are errors (a typo such as ``camId`` must not silently
drop the camera). :func:`read_manifest` reports every problem of the file at once as
``file:line: field: reason``. ``Tracklet.extra`` carries ``camera``, ``split``, ``meta`` and
``source`` (``file:line``).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import operator
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vvireid.model.fileio import write_text_atomic
from vvireid.model.types import Modality, Tracklet

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("tracklet_id", "modality", "camid", "frames")
OPTIONAL_FIELDS = ("camera", "pid", "timestamp", "split", "meta")
SPLITS = ("train", "query", "gallery")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
UNKNOWN_PID_FOLDER = "unknown"


class ManifestError(ValueError):
    """A manifest (or a folder tree being scanned) is malformed; ``problems`` lists them all."""

    def __init__(self, problems: Sequence[str], *, limit: int = 50) -> None:
        self.problems = list(problems)
        shown = self.problems[:limit]
        more = len(self.problems) - len(shown)
        lines = "\n  ".join(shown) + (f"\n  ... and {more} more" if more > 0 else "")
        super().__init__(f"{len(self.problems)} problem(s):\n  {lines}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_problems(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, reason) for each malformed optional field of one record (null means absent)."""
    camera, pid, timestamp = record.get("camera"), record.get("pid"), record.get("timestamp")
    found = []
    if camera is not None and not isinstance(camera, str):
        found.append(("camera", "must be a string"))
    if pid is not None and not (_is_int(pid) and pid >= 0):
        found.append(("pid", f"must be an integer >= 0 (omit it when unknown), got {pid!r}"))
    if timestamp is not None and not (
        isinstance(timestamp, (int, float))
        and not isinstance(timestamp, bool)
        and math.isfinite(timestamp)
    ):
        found.append(("timestamp", f"must be a finite number, got {timestamp!r}"))
    if record.get("split") is not None and record["split"] not in SPLITS:
        found.append(("split", f"must be one of {', '.join(SPLITS)}, got {record['split']!r}"))
    if record.get("meta") is not None and not isinstance(record["meta"], dict):
        found.append(("meta", "must be a JSON object"))
    return found


def _required_problems(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, reason) for each missing or malformed required field of one record."""
    found = [(key, "missing") for key in REQUIRED_FIELDS if record.get(key) is None]
    tracklet_id = record.get("tracklet_id")
    if tracklet_id is not None and not (isinstance(tracklet_id, str) and tracklet_id.strip()):
        found.append(("tracklet_id", "must be a non-empty string"))
    if record.get("modality") is not None:
        try:
            Modality.parse(record["modality"])
        except ValueError as exc:
            found.append(("modality", str(exc)))
    camid = record.get("camid")
    if camid is not None and not (_is_int(camid) and camid >= 0):
        found.append(("camid", f"must be an integer >= 0, got {camid!r}"))
    frames = record.get("frames")
    if frames is not None and (not isinstance(frames, list) or not frames):
        found.append(("frames", "must be a non-empty list of image paths"))
    elif frames is not None and not all(isinstance(p, str) and p.strip() for p in frames):
        found.append(("frames", "every entry must be a non-empty path string"))
    return found


def _record_problems(record: Any) -> list[tuple[str, str]]:
    """Every (field, reason) wrong with one decoded line; empty when a Tracklet can be built."""
    if not isinstance(record, dict):
        return [("line", "must be a JSON object")]
    known = REQUIRED_FIELDS + OPTIONAL_FIELDS
    found = []
    for key in record:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            found.append(
                (key, "unknown field" + (f" (did you mean {close[0]!r}?)" if close else ""))
            )
    return found + _required_problems(record) + _optional_problems(record)


def _resolve(base: Path, frame: str) -> str:
    path = Path(frame).expanduser()
    return str(path if path.is_absolute() else Path(os.path.normpath(base / path)))


def _to_tracklet(record: dict[str, Any], base: Path, source: str) -> Tracklet:
    extra = {"source": source}
    for key in ("camera", "split", "meta"):
        if record.get(key) is not None:
            extra[key] = record[key]
    timestamp = record.get("timestamp")
    return Tracklet(
        tracklet_id=record["tracklet_id"],
        frames=tuple(_resolve(base, p) for p in record["frames"]),
        modality=Modality.parse(record["modality"]),
        camid=record["camid"],
        pid=record.get("pid"),
        timestamp=None if timestamp is None else float(timestamp),
        extra=extra,
    )


def parse_manifest(lines: Iterable[str], *, source: str, base: str | Path) -> list[Tracklet]:
    """Parse manifest lines (``source`` names the file in messages; ``base`` anchors paths).

    Raises:
        ManifestError: listing every problem as ``source:line: field: reason``.
    """
    base = Path(base)
    problems: list[str] = []
    tracklets: list[Tracklet] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: json: {exc.msg} (column {exc.colno})")
            continue
        found = _record_problems(record)
        tracklet_id = None if found else record["tracklet_id"]
        if tracklet_id in first_line:
            found = [("tracklet_id", f"{tracklet_id!r} duplicates line {first_line[tracklet_id]}")]
        problems += [f"{where}: {field}: {reason}" for field, reason in found]
        if not found:
            first_line[tracklet_id] = number
            tracklets.append(_to_tracklet(record, base, where))
    if problems:
        raise ManifestError(problems)
    return tracklets


def read_manifest(path: str | Path) -> list[Tracklet]:
    """Read a JSONL manifest into Tracklets with absolute frame paths (existence is not checked).

    Raises:
        ManifestError: the file is missing or unreadable, or lists every malformed line.
    """
    path = Path(path).expanduser()
    text = read_manifest_text(path)
    tracklets = parse_manifest(text.splitlines(), source=str(path), base=path.resolve().parent)
    log.debug("read %d tracklets from %s", len(tracklets), path)
    return tracklets


def read_manifest_text(path: Path) -> str:
    """A manifest file's text, shared by the strict reader and the index build's lenient one.

    Raises:
        ManifestError: the file is missing, unreadable or not UTF-8, naming it.
    """
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError([f"{path}: missing file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError([f"{path}: cannot read ({exc})"]) from None


def tracklet_record(tracklet: Tracklet, base: Path | None = None) -> dict[str, Any]:
    """The manifest record of a tracklet; frames under ``base`` are written relative to it."""
    record: dict[str, Any] = {
        "tracklet_id": tracklet.tracklet_id,
        "modality": Modality.parse(tracklet.modality).label,
        "camid": _plain_int(tracklet.camid),
    }
    extra = tracklet.extra or {}
    if extra.get("camera") is not None:
        record["camera"] = extra["camera"]
    pid = None if tracklet.pid is None else _plain_int(tracklet.pid)
    timestamp = None if tracklet.timestamp is None else float(tracklet.timestamp)
    for key, value in (("pid", pid), ("timestamp", timestamp), ("split", extra.get("split"))):
        if value is not None:
            record[key] = value
    record["frames"] = [_relative(frame, base) for frame in tracklet.frames]
    if extra.get("meta") is not None:
        record["meta"] = extra["meta"]
    return record


def _plain_int(value: Any) -> Any:
    """numpy integers become ints; anything else is left for the validator to reject."""
    try:
        return operator.index(value)
    except TypeError:
        return value


def _relative(frame: str, base: Path | None) -> str:
    path = Path(frame)
    if base is not None and path.is_absolute():
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            pass
    return path.as_posix()


def write_manifest(path: str | Path, tracklets: Iterable[Tracklet]) -> None:
    """Write tracklets as a manifest atomically (temp file in the same folder, fsync, replace).

    Frames inside the manifest's folder are stored relative to it, so the folder can be moved.

    Raises:
        ManifestError: listing every tracklet that would not read back (bad camid, duplicate id...),
            numbered from 1 in input order; nothing is written then.
    """
    path = Path(path).expanduser()
    base = path.resolve().parent
    records = [tracklet_record(t, base) for t in tracklets]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    parse_manifest(lines, source=f"{path} [tracklet #]", base=base)  # the reader's rules
    base.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    log.info("wrote %d tracklets to %s", len(records), path)


def natural_key(name: str) -> list[Any]:
    """Sort key comparing digit runs as numbers, so ``2.jpg`` comes before ``10.jpg``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)] + [
        name
    ]


def _subdirs(
    folder: Path, problems: list[str], what: str, skip_suffixes: tuple[str, ...] = ()
) -> list[Path]:
    entries = sorted(
        (
            p
            for p in folder.iterdir()
            if not p.name.startswith(".")
            and not (p.suffix.lower() in skip_suffixes and p.is_file())
        ),
        key=lambda p: natural_key(p.name),
    )
    for entry in entries:
        if not entry.is_dir():
            problems.append(f"{entry}: layout: expected a {what} folder, found a file")
    return [e for e in entries if e.is_dir()]


def scan_folder(root: str | Path) -> list[Tracklet]:
    """Build tracklets from a folder tree (no manifest needed).

    Layout: ``<root>/<pid or "unknown">/<visible|infrared>/<camid>/<tracklet>/<frames>``. The pid
    folder is an integer or ``unknown`` (pid None); the modality folder any ``Modality.parse``
    spelling (``visible``, ``rgb``, ``infrared``, ``ir``); camid an integer >= 0. Frames are the
    image files (jpg, jpeg, png, bmp, webp, tif, tiff) of the tracklet folder in natural name
    order (``2.jpg`` before ``10.jpg``). The tracklet id is the relative path
    ``<pid>/<modality>/<camid>/<tracklet>``, unique by construction. Hidden entries are ignored,
    and so are ``.jsonl`` files at the root (a manifest written into the tree it lists must not
    break the next scan); any other misplaced file is a problem.

    Raises:
        ManifestError: listing every misplaced file, bad folder name and empty tracklet.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ManifestError([f"{root}: missing folder"])
    problems: list[str] = []
    tracklets: list[Tracklet] = []
    for pid_dir in _subdirs(root, problems, "<pid>|unknown", skip_suffixes=(".jsonl",)):
        pid = _folder_pid(pid_dir, problems)
        for mod_dir in _subdirs(pid_dir, problems, "<visible|infrared>"):
            try:
                modality = Modality.parse(mod_dir.name)
            except ValueError as exc:
                problems.append(f"{mod_dir}: modality: {exc}")
                continue
            for cam_dir in _subdirs(mod_dir, problems, "<camid>"):
                if not cam_dir.name.isdigit():
                    problems.append(f"{cam_dir}: camid: folder name must be an integer >= 0")
                    continue
                for track_dir in _subdirs(cam_dir, problems, "<tracklet>"):
                    frames = _frames(track_dir, problems)
                    if frames and pid is not False:
                        tracklets.append(
                            Tracklet(
                                tracklet_id=track_dir.relative_to(root).as_posix(),
                                frames=frames,
                                modality=modality,
                                camid=int(cam_dir.name),
                                pid=pid,
                                extra={"source": str(track_dir)},
                            )
                        )
    if problems:
        raise ManifestError(problems)
    return tracklets


def _folder_pid(pid_dir: Path, problems: list[str]) -> int | None | bool:
    """The pid of an identity folder: int, None for ``unknown``, False when invalid."""
    if pid_dir.name == UNKNOWN_PID_FOLDER:
        return None
    if pid_dir.name.isdigit():
        return int(pid_dir.name)
    problems.append(f"{pid_dir}: pid: folder name must be an integer or {UNKNOWN_PID_FOLDER!r}")
    return False


def _frames(track_dir: Path, problems: list[str]) -> tuple[str, ...]:
    frames = []
    for entry in sorted(track_dir.iterdir(), key=lambda p: natural_key(p.name)):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
            frames.append(str(entry))
        else:
            problems.append(
                f"{entry}: frames: not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
    if not frames:
        problems.append(f"{track_dir}: frames: tracklet folder holds no images")
    return tuple(frames)
