"""HITSZ-VCM reader (Lin et al., "Learning Modal-Invariant and Temporal-Memory for Video-based
Visible-Infrared Person Re-Identification", CVPR 2022; https://github.com/VCM-project233/MITML).

927 identities (500 train, 427 test) seen by 12 cameras (6 visible, 6 infrared), 251,452 RGB and
211,807 IR frames; tracklets are cut into 24-frame pieces. After the official >= 12 frame filter
[3rd-party counts]: train 9,751 tracklets (4,291 IR + 5,460 RGB), test 4,584 IR queries and 5,099
RGB gallery tracklets.

Layout (both are accepted, per identity folder, ``Train|Test/<pid4>`` tried first)::

    <root>/info/{train_name,test_name,track_train_info,track_test_info,query_IDX}.txt
    <root>/Train/<pid4>/<ir|rgb>/D<cam>/<frame>.jpg      (VLD / X-ReID layout)
    <root>/Test/<pid4>/<ir|rgb>/D<cam>/<frame>.jpg
    <root>/<pid4>/<ir|rgb>/D<cam>/<frame>.jpg            (flat layout of the dataset page and MITML)

``*_name.txt`` holds one image name per line (``0001M2D3T1F1.jpg`` -> ``0001/rgb/D3/1.jpg``);
``track_*_info.txt`` one tracklet per line, ``m start end pid camid`` with 1-based inclusive
positions into the name file (m == 1 is IR, anything else RGB); ``query_IDX.txt`` 1-based rows of
``track_test_info.txt``, of which only the **last line** counts (as in the official reader).

Protocol (MITML's official evaluation; docs/fidelity.md D1-D5): query = the rows listed in
``query_IDX`` (IR), gallery = every other test row (RGB), both filtered to >= 12 frames *after* the
split; ``vis_to_ir`` swaps the two sets. Gallery items with the query's pid and camid are removed at
evaluation time (``filter_same_camera=True``). Test pids stay raw; camids are stored 0-based
(``camid - 1``, as X-ReID does; equality tests are unaffected). Train pids are relabelled
``0..C-1`` in ascending raw order over the tracklets that pass the length filter, so no class is
left without data (the official code iterates a Python ``set``, ascending only by CPython accident).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from vvireid.indexer.sources.splits import DatasetError, DatasetSplits, read_text, relabel_map
from vvireid.model.types import Direction, Modality, Tracklet

log = logging.getLogger(__name__)

INFO_FILES = (
    "train_name.txt",
    "test_name.txt",
    "track_train_info.txt",
    "track_test_info.txt",
    "query_IDX.txt",
)
MIN_SEQ_LEN = 12


@dataclass(frozen=True)
class TrackRow:
    """One parsed line of ``track_*_info.txt``."""

    line: int
    m: int
    start: int
    end: int
    pid: int
    camid: int

    @property
    def modality(self) -> Modality:
        return Modality.INFRARED if self.m == 1 else Modality.VISIBLE

    def __len__(self) -> int:
        return self.end - self.start + 1


def decode_frame_name(name: str) -> tuple[str, str, str, str]:
    """``0001M2D3T1F1.jpg`` -> (pid folder, ``ir``|``rgb``, camera folder, file name).

    Follows the official decoding: pid = chars 0-3, modality = char 5 ('1' -> ir), camera folder
    = from the first 'D' up to the first 'T', file = everything after the first 'F'.

    Raises:
        ValueError: saying which part of the name is malformed.
    """
    if len(name) < 6 or not name[:4].isdigit() or name[4] != "M":
        raise ValueError(
            "expected '<pid 4 digits>M<m>D<cam>T<tracklet>F<frame>', e.g. 0001M2D3T1F1.jpg"
        )
    d, t, f = name.find("D"), name.find("T"), name.find("F")
    if not 0 < d < t < f or f == len(name) - 1:
        raise ValueError("missing or misplaced D<cam>, T<tracklet> or F<frame> part")
    return name[:4], "ir" if name[5] == "1" else "rgb", name[d:t], name[f + 1 :]


def _read_lines(path: Path, problems: list[str]) -> list[str] | None:
    text = read_text(path, problems)
    if text is None:
        return None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _parse_tracks(path: Path, lines: list[str], problems: list[str]) -> list[TrackRow]:
    rows = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        where = f"{path}:{number}"
        if len(fields) != 5:
            problems.append(
                f"{where}: line: expected 5 integers 'm start end pid camid', got {line!r}"
            )
            continue
        try:
            m, start, end, pid, camid = (int(x) for x in fields)
        except ValueError:
            problems.append(f"{where}: line: not all integers: {line!r}")
            continue
        if start < 1 or end < start:
            problems.append(f"{where}: start/end: need 1 <= start <= end, got {start} {end}")
            continue
        if camid < 1:
            problems.append(f"{where}: camid: cameras are numbered from 1, got {camid}")
            continue
        rows.append(TrackRow(number, m, start, end, pid, camid))
    return rows


def _parse_query_idx(
    path: Path, lines: list[str], num_rows: int, problems: list[str], warnings: list[str]
) -> list[int]:
    """0-based test rows of the query set, from the last non-blank line (official rule)."""
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        problems.append(f"{path}: file: no query indices")
        return []
    if len(numbered) > 1:
        warnings.append(
            f"{path}: lines: {len(numbered)} non-blank lines; only the last one is used "
            "(official reader behaviour)"
        )
    number, line = numbered[-1]
    rows, seen = [], set()
    for token in line.split():
        where = f"{path}:{number}"
        if not token.isdigit():
            problems.append(f"{where}: index: {token!r} is not a positive integer")
        elif not 1 <= int(token) <= num_rows:
            problems.append(
                f"{where}: index: {token} is outside 1..{num_rows} (rows of track_test_info.txt)"
            )
        elif int(token) in seen:
            problems.append(f"{where}: index: {token} is listed twice")
        else:
            seen.add(int(token))
            rows.append(int(token) - 1)
    return rows


class _Resolver:
    """Turns image names into absolute frame paths, choosing the layout per identity folder."""

    def __init__(self, root: Path, split_dir: str, names_path: Path, names: list[str]) -> None:
        self.root, self.split_dir = root, split_dir
        self.names_path, self.names = names_path, names
        self._bases: dict[str, Path | None] = {}
        self._missing_reported: set[str] = set()

    def base(self, pid4: str) -> Path | None:
        if pid4 not in self._bases:
            candidates = (self.root / self.split_dir / pid4, self.root / pid4)
            self._bases[pid4] = next((c for c in candidates if c.is_dir()), None)
        return self._bases[pid4]

    def frames(
        self, row: TrackRow, track_where: str, problems: list[str], warnings: list[str]
    ) -> tuple[str, ...] | None:
        if row.end > len(self.names):
            problems.append(
                f"{track_where}: end: {row.end} is past the last line "
                f"({len(self.names)}) of {self.names_path}"
            )
            return None
        frames, ok = [], True
        for number in range(row.start, row.end + 1):
            name = self.names[number - 1].strip()
            try:
                pid4, mod_dir, cam_dir, file = decode_frame_name(name)
            except ValueError as exc:
                problems.append(f"{self.names_path}:{number}: name: {name!r}: {exc}")
                ok = False
                continue
            base = self.base(pid4)
            if base is None:
                if pid4 not in self._missing_reported:
                    self._missing_reported.add(pid4)
                    problems.append(
                        f"{self.names_path}:{number}: name: {name!r}: no identity folder "
                        f"{self.root / self.split_dir / pid4} or {self.root / pid4}"
                    )
                ok = False
                continue
            if int(pid4) != row.pid or (mod_dir == "ir") != (row.m == 1):
                warnings.append(
                    f"{self.names_path}:{number}: name: {name!r} disagrees with {track_where} "
                    f"(pid {row.pid}, m {row.m})"
                )
            frames.append(str(base / mod_dir / cam_dir / file))
        return tuple(frames) if ok else None


def _tracklets(
    split: str,
    rows: list[TrackRow],
    track_path: Path,
    resolver: _Resolver,
    problems: list[str],
    warnings: list[str],
) -> list[Tracklet | None]:
    """One Tracklet per track row (None where the row is broken); raw pids, 0-based camids."""
    out: list[Tracklet | None] = []
    for row in rows:
        where = f"{track_path}:{row.line}"
        if row.m not in (1, 2):
            warnings.append(f"{where}: m: {row.m} is neither 1 (IR) nor 2 (RGB); read as RGB")
        frames = resolver.frames(row, where, problems, warnings)
        out.append(
            None
            if frames is None
            else Tracklet(
                tracklet_id=f"{split}/{row.line}",
                frames=frames,
                modality=row.modality,
                camid=row.camid - 1,
                pid=row.pid,
                extra={
                    "source": where,
                    "names_file": str(resolver.names_path),
                    "first_name_line": row.start,
                },
            )
        )
    return out


def load_hitsz_vcm(
    root: str | Path, *, min_seq_len: int = MIN_SEQ_LEN, strict: bool = True
) -> DatasetSplits:
    """Read HITSZ-VCM from ``root`` (the folder holding ``info/``).

    Args:
        root: dataset folder, either layout (see module docstring).
        min_seq_len: tracklets shorter than this are dropped from every split (official: 12).
        strict: raise on any problem (training must not run on a damaged list). False keeps
            what parses, skips the rest and lists every problem in ``extra['problems']``, so that
            ``data check`` can go on to examine the frames of the lines that did parse.

    Raises:
        DatasetError: listing every missing file, malformed line and missing identity folder
            (with ``strict=False`` only when an info file is missing or unreadable).
    """
    root = Path(root).expanduser().resolve()
    info = root / "info"
    problems: list[str] = []
    warnings: list[str] = []
    text = {name: _read_lines(info / name, problems) for name in INFO_FILES}
    if any(lines is None for lines in text.values()):
        raise DatasetError(problems)

    train_rows = _parse_tracks(
        info / "track_train_info.txt", text["track_train_info.txt"], problems
    )
    test_rows = _parse_tracks(info / "track_test_info.txt", text["track_test_info.txt"], problems)
    query_rows = _parse_query_idx(
        info / "query_IDX.txt",
        text["query_IDX.txt"],
        len(text["track_test_info.txt"]),
        problems,
        warnings,
    )
    train_resolver = _Resolver(root, "Train", info / "train_name.txt", text["train_name.txt"])
    test_resolver = _Resolver(root, "Test", info / "test_name.txt", text["test_name.txt"])
    train_all = _tracklets(
        "train", train_rows, info / "track_train_info.txt", train_resolver, problems, warnings
    )
    test_all = _tracklets(
        "test", test_rows, info / "track_test_info.txt", test_resolver, problems, warnings
    )
    if problems and strict:
        raise DatasetError(problems)
    splits = _assemble(train_all, test_all, test_rows, query_rows, min_seq_len, warnings)
    splits.extra["problems"] = problems
    return splits


def _assemble(
    train_all: list[Tracklet | None],
    test_all: list[Tracklet | None],
    test_rows: list[TrackRow],
    query_rows: list[int],
    min_seq_len: int,
    warnings: list[str],
) -> DatasetSplits:
    def keep(t: Tracklet | None) -> bool:
        return t is not None and len(t) >= min_seq_len

    by_line = {row.line - 1: t for row, t in zip(test_rows, test_all, strict=True)}
    query_set = set(query_rows)
    query = [by_line[i] for i in query_rows if keep(by_line.get(i))]  # a bad row is skipped
    gallery = [t for i, t in sorted(by_line.items()) if i not in query_set and keep(t)]
    for t in query:
        if t.modality != Modality.INFRARED:
            warnings.append(f"{t.extra['source']}: m: a query_IDX row is not IR")
    for t in gallery:
        if t.modality != Modality.VISIBLE:
            warnings.append(f"{t.extra['source']}: m: a gallery (non-query) row is not RGB")

    train_kept = [t for t in train_all if keep(t)]
    labels = relabel_map(t.pid for t in train_kept)
    train = [_with_pid(t, labels[t.pid]) for t in train_kept]
    cams = {t.camid for t in train + query + gallery}
    dropped = sum(not keep(t) for t in train_all + test_all)
    log.info(
        "HITSZ-VCM: %d train tracklets (%d ids), %d IR queries, %d RGB gallery; "
        "%d tracklets < %d frames dropped",
        len(train),
        len(labels),
        len(query),
        len(gallery),
        dropped,
        min_seq_len,
    )
    if warnings:
        log.warning("HITSZ-VCM: %d warnings, first: %s", len(warnings), warnings[0])
    return DatasetSplits(
        name="hitsz-vcm",
        train=train,
        query={Direction.IR_TO_VIS: query, Direction.VIS_TO_IR: gallery},
        gallery={Direction.IR_TO_VIS: gallery, Direction.VIS_TO_IR: query},
        num_train_pids=len(labels),
        num_train_cams=max(cams, default=-1) + 1,
        test_sampling="rrs_test",
        filter_same_camera=True,
        train_pairs=None,
        extra={"warnings": warnings, "raw_train_pids": sorted(labels), "dropped_short": dropped},
    )


def _with_pid(t: Tracklet, pid: int) -> Tracklet:
    extra = dict(t.extra, raw_pid=t.pid)
    return Tracklet(t.tracklet_id, t.frames, t.modality, t.camid, pid, t.timestamp, extra)
