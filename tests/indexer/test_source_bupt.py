"""BUPTCampus reader on small hand-made trees: pairs, string-sorted labels, directions, drop."""

import json
from pathlib import Path

import pytest
from vvireid.indexer.sources.bupt import CAMERAS, load_buptcampus, official_rgb_drop
from vvireid.indexer.sources.splits import DatasetError
from vvireid.model.types import Modality

TRAIN = ["1 RGB/IR LS3 1", "1 RGB/IR G25 2", "10 RGB/IR CQ1 1", "2 RGB/IR W4 1", "2 RGB/IR TSG1 3"]
AUX = ["900 RGB/IR TSG2 1"]
QUERY = ["3 IR LS3 1", "4 RGB G25 1"]
GALLERY = ["3 RGB G25 2", "3 IR G25 2", "4 RGB LS3 2", "4 IR LS3 2"]


def write_bupt(root: Path, *, train=TRAIN, query=QUERY, gallery=GALLERY, frames=3) -> Path:
    """data_paths.json covering every listed tracklet (both modalities), the lists and DATA/."""
    paths: dict = {}
    for line in train + AUX + query + gallery:
        pid, _, cam, tid = line.split()
        for mod in ("RGB", "IR"):
            rel = [f"{pid}/{mod}/{cam}/{pid}_{mod}_{cam}_{tid}_{i}.jpg" for i in range(frames)]
            paths.setdefault(pid, {}).setdefault(mod, {}).setdefault(cam, {})[tid] = rel
            for r in rel:
                (root / "DATA" / r).parent.mkdir(parents=True, exist_ok=True)
                (root / "DATA" / r).write_bytes(b"")
    (root / "data_paths.json").write_text(json.dumps(paths))
    for name, lines in (
        ("train", train),
        ("train_auxiliary", AUX),
        ("query", query),
        ("gallery", gallery),
    ):
        (root / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
    return root


def test_train_pairs_are_aligned_and_labels_sort_string_ids(tmp_path):
    splits = load_buptcampus(write_bupt(tmp_path))
    assert (
        splits.name == "bupt"
        and splits.test_sampling == "uniform"
        and not splits.filter_same_camera
    )
    assert splits.num_train_pids == 3 and splits.num_train_cams == 6
    assert len(splits.train_pairs) == 5
    for (r, i), line in zip(splits.train_pairs, TRAIN, strict=True):
        rgb, ir = splits.train[r], splits.train[i]
        pid, _, cam, tid = line.split()
        assert (rgb.modality, ir.modality) == (Modality.VISIBLE, Modality.INFRARED)
        assert rgb.pid == ir.pid and rgb.camid == ir.camid == CAMERAS[cam]
        assert rgb.frames[0].endswith(f"DATA/{pid}/RGB/{cam}/{pid}_RGB_{cam}_{tid}_0.jpg")
        assert ir.frames[0].endswith(f"DATA/{pid}/IR/{cam}/{pid}_IR_{cam}_{tid}_0.jpg")
    # official rule: sorted("1", "10", "2") -> labels 0, 1, 2
    assert [splits.train[r].pid for r, _ in splits.train_pairs] == [0, 0, 1, 2, 2]
    aux = splits.extra["auxiliary"]
    assert [(t.pid, t.modality, t.camid) for t in aux] == [
        (900, Modality.VISIBLE, 5),
        (900, Modality.INFRARED, 5),
    ]


def test_directions_use_modality_of_each_line(tmp_path):
    splits = load_buptcampus(write_bupt(tmp_path))
    q, g = splits.query, splits.gallery
    assert [(t.pid, t.modality, t.camid) for t in q["ir_to_vis"]] == [(3, Modality.INFRARED, 0)]
    assert [(t.pid, t.modality) for t in g["ir_to_vis"]] == [
        (3, Modality.VISIBLE),
        (4, Modality.VISIBLE),
    ]
    assert [(t.pid, t.modality, t.camid) for t in q["vis_to_ir"]] == [(4, Modality.VISIBLE, 1)]
    assert [(t.pid, t.modality) for t in g["vis_to_ir"]] == [
        (3, Modality.INFRARED),
        (4, Modality.INFRARED),
    ]


def test_data_folder_is_accepted_as_root(tmp_path):
    splits = load_buptcampus(write_bupt(tmp_path) / "DATA")
    assert len(splits.train) == 10


def test_official_rgb_drop_is_optional_and_skips_a_zero_remainder(tmp_path):
    gallery = [f"{p} {m} LS3 1" for p in range(100, 166) for m in ("RGB", "IR")]  # 66 RGB
    query = [f"{p} RGB G25 1" for p in range(100, 164)] + ["3 IR LS3 1"]  # 64 RGB: remainder 0
    root = write_bupt(tmp_path, query=query, gallery=gallery, frames=1)
    kept = load_buptcampus(root)
    assert len(kept.gallery["ir_to_vis"]) == 66 and len(kept.query["vis_to_ir"]) == 64
    dropped = load_buptcampus(root, drop_last_rgb_batch=True)
    assert [t.pid for t in dropped.gallery["ir_to_vis"]] == list(range(100, 164))  # last 2 RGB gone
    assert len(dropped.gallery["vis_to_ir"]) == 66  # IR untouched
    assert len(dropped.query["vis_to_ir"]) == 64  # 64 % 64 == 0: nothing dropped (official: all)
    assert len(official_rgb_drop(kept.gallery["ir_to_vis"], batch=10)) == 60


def test_every_problem_is_listed(tmp_path):
    train = TRAIN + ["1 RGB LS3 1", "5 RGB/IR XX9 1", "6 RGB/IR LS3", "7 RGB/IR LS3 99"]
    root = write_bupt(tmp_path, train=TRAIN)
    (root / "train.txt").write_text("".join(line + "\n" for line in train))
    (root / "query.txt").write_text("3 IR LS3 1\nabc IR LS3 1\n")
    with pytest.raises(DatasetError) as caught:
        load_buptcampus(root)
    problems = caught.value.problems
    expected = [
        "train.txt:6: modality: 'RGB'; expected RGB/IR",
        "train.txt:7: camera: unknown camera 'XX9'; known: LS3, G25",
        "train.txt:8: line: expected 'pid modality camera tracklet_id'",
        "train.txt:9: tracklet: 7/RGB/LS3/99 is not in data_paths.json",
        "train.txt:9: tracklet: 7/IR/LS3/99 is not in data_paths.json",
        "query.txt:2: pid: 'abc' is not a non-negative integer",
    ]
    for text in expected:
        assert any(text in p for p in problems), (text, problems)
    assert len(problems) == len(expected)


def test_missing_and_malformed_json(tmp_path):
    with pytest.raises(DatasetError, match="data_paths.json: missing file"):
        load_buptcampus(tmp_path)
    (tmp_path / "data_paths.json").write_text('{"1": {"RGB": ')
    with pytest.raises(DatasetError, match=r"data_paths.json:1: json"):
        load_buptcampus(tmp_path)
