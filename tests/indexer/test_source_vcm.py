"""HITSZ-VCM reader against small hand-made trees with known counts."""

from pathlib import Path

import pytest
from vvireid.indexer.sources.splits import DatasetError
from vvireid.indexer.sources.vcm import decode_frame_name, load_hitsz_vcm
from vvireid.model.types import Modality

# (m, pid, camid, frames): m 1 = IR, 2 = RGB
TRAIN = [(2, 5, 3, 12), (1, 5, 2, 13), (2, 2, 1, 11), (1, 2, 1, 12), (2, 2, 4, 12)]
TEST = [(1, 100, 1, 12), (2, 100, 2, 12), (1, 101, 3, 5), (2, 101, 1, 12), (1, 101, 2, 12)]
QUERY_IDX = "1 2\n5 1 3\n"  # only the last line counts: rows 5, 1, 3


def write_vcm(root: Path, *, flat: bool = False, query_idx: str = QUERY_IDX) -> Path:
    """Write info files and (empty) frame files for TRAIN/TEST in either layout."""
    info = root / "info"
    info.mkdir(parents=True)
    for split, rows in (("train", TRAIN), ("test", TEST)):
        names, tracks = [], []
        for t, (m, pid, cam, n) in enumerate(rows, start=1):
            start = len(names) + 1
            for f in range(1, n + 1):
                name = f"{pid:04d}M{m}D{cam}T{t}F{100 * t + f}.jpg"
                names.append(name)
                folder = (
                    root
                    / ("" if flat else split.capitalize())
                    / f"{pid:04d}"
                    / ("ir" if m == 1 else "rgb")
                )
                (folder / f"D{cam}").mkdir(parents=True, exist_ok=True)
                (folder / f"D{cam}" / f"{100 * t + f}.jpg").write_bytes(b"")
            tracks.append(f"{m} {start} {len(names)} {pid:04d} {cam}")
        (info / f"{split}_name.txt").write_text("\n".join(names) + "\n")
        (info / f"track_{split}_info.txt").write_text("\n".join(tracks) + "\n")
    (info / "query_IDX.txt").write_text(query_idx)
    return root


def test_split_layout_counts_relabel_and_protocol(tmp_path):
    splits = load_hitsz_vcm(write_vcm(tmp_path))
    assert (
        splits.name == "hitsz-vcm"
        and splits.test_sampling == "rrs_test"
        and splits.filter_same_camera
    )
    # the 11-frame train tracklet is dropped; pids 2, 5 -> labels 0, 1 (ascending)
    assert [(t.modality, t.pid, t.camid, len(t)) for t in splits.train] == [
        (Modality.VISIBLE, 1, 2, 12),
        (Modality.INFRARED, 1, 1, 13),
        (Modality.INFRARED, 0, 0, 12),
        (Modality.VISIBLE, 0, 3, 12),
    ]
    assert splits.num_train_pids == 2 and splits.train_pairs is None
    query, gallery = splits.query["ir_to_vis"], splits.gallery["ir_to_vis"]
    # query_IDX order (rows 5 then 1), the 5-frame row 3 filtered after the split
    assert [(t.pid, t.camid, t.modality) for t in query] == [
        (101, 1, Modality.INFRARED),
        (100, 0, Modality.INFRARED),
    ]
    assert [(t.pid, t.camid, t.modality) for t in gallery] == [
        (100, 1, Modality.VISIBLE),
        (101, 0, Modality.VISIBLE),
    ]
    assert splits.query["vis_to_ir"] == gallery and splits.gallery["vis_to_ir"] == query
    assert splits.num_train_cams == 4  # camids 0..3 after camid - 1


def test_frame_paths_follow_the_name_grammar(tmp_path):
    splits = load_hitsz_vcm(write_vcm(tmp_path))
    first = splits.train[0]
    assert first.frames[0] == str(tmp_path.resolve() / "Train/0005/rgb/D3/101.jpg")
    assert first.frames[-1].endswith("Train/0005/rgb/D3/112.jpg")
    assert all(Path(f).is_file() for t in splits.train for f in t.frames)
    assert decode_frame_name("0001M2D3T1F1.jpg") == ("0001", "rgb", "D3", "1.jpg")
    assert decode_frame_name("0503M1D12T4F77.jpg") == ("0503", "ir", "D12", "77.jpg")
    with pytest.raises(ValueError):
        decode_frame_name("0001M2X3T1F1.jpg")


def test_flat_layout_reads_the_same_dataset(tmp_path):
    split = load_hitsz_vcm(write_vcm(tmp_path / "split"))
    flat = load_hitsz_vcm(write_vcm(tmp_path / "flat", flat=True))
    assert [t.pid for t in flat.train] == [t.pid for t in split.train]
    assert flat.train[0].frames[0] == str((tmp_path / "flat").resolve() / "0005/rgb/D3/101.jpg")
    assert len(flat.query["ir_to_vis"]) == len(split.query["ir_to_vis"]) == 2


def test_min_seq_len_is_an_option(tmp_path):
    splits = load_hitsz_vcm(write_vcm(tmp_path), min_seq_len=1)
    assert len(splits.train) == 5
    assert [t.pid for t in splits.query["ir_to_vis"]] == [101, 100, 101]


def test_every_problem_is_listed_with_file_and_line(tmp_path):
    root = write_vcm(tmp_path, query_idx="1 x 99\n")
    info = root / "info"
    tracks = (info / "track_train_info.txt").read_text().splitlines()
    tracks[1] = "1 13 25 5"  # 4 fields
    tracks[3] = "1 a 3 2 1"  # not an integer
    tracks.append("2 60 99 7 1")  # past the end of train_name.txt
    (info / "track_train_info.txt").write_text("\n".join(tracks) + "\n")
    names = (info / "test_name.txt").read_text().splitlines()
    names[0] = "garbage.jpg"
    (info / "test_name.txt").write_text("\n".join(names) + "\n")
    with pytest.raises(DatasetError) as caught:
        load_hitsz_vcm(root)
    problems = caught.value.problems
    expected = [
        "track_train_info.txt:2: line: expected 5 integers",
        "track_train_info.txt:4: line: not all integers",
        "track_train_info.txt:6: end: 99 is past the last line",
        "query_IDX.txt:1: index: 'x' is not a positive integer",
        "query_IDX.txt:1: index: 99 is outside 1..5",
        "test_name.txt:1: name: 'garbage.jpg'",
    ]
    for text in expected:
        assert any(text in p for p in problems), (text, problems)
    assert len(problems) == len(expected)


def test_missing_files_and_identity_folders_are_reported(tmp_path):
    root = write_vcm(tmp_path)
    (root / "info" / "query_IDX.txt").unlink()
    with pytest.raises(DatasetError, match="query_IDX.txt: missing file"):
        load_hitsz_vcm(root)
    root = write_vcm(tmp_path / "b")
    for path in sorted((root / "Test" / "0100").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "Test" / "0100").rmdir()
    with pytest.raises(DatasetError, match="no identity folder .*0100"):
        load_hitsz_vcm(root)
