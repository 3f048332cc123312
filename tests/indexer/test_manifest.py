"""Tracklet manifests: round trip, all-problems error listing, folder scanning, dataset splits."""

import json

import pytest
from vvireid.indexer.manifest import ManifestError, read_manifest, scan_folder, write_manifest
from vvireid.indexer.sources.manifest_dataset import load_manifest_dataset
from vvireid.indexer.sources.splits import DatasetError
from vvireid.model.types import Modality, Tracklet


def _tracklet(tid, modality, camid, frames, pid=None, split=None, **extra):
    if split is not None:
        extra["split"] = split
    return Tracklet(
        tid,
        tuple(str(f) for f in frames),
        modality,
        camid,
        pid,
        extra.pop("timestamp", None),
        extra,
    )


def test_round_trip_keeps_every_field_and_relative_paths(tmp_path):
    inside = [tmp_path / "frames" / f"{i}.jpg" for i in range(3)]
    outside = [tmp_path.parent / "elsewhere" / "a.jpg"]
    tracklets = [
        _tracklet(
            "a",
            Modality.INFRARED,
            3,
            inside,
            pid=7,
            split="query",
            camera="gate",
            timestamp=12.5,
            meta={"site": "north"},
        ),
        _tracklet("b", Modality.VISIBLE, 0, outside),
    ]
    path = tmp_path / "m.jsonl"
    write_manifest(path, tracklets)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["frames"] == ["frames/0.jpg", "frames/1.jpg", "frames/2.jpg"]
    assert lines[0]["modality"] == "infrared" and lines[0]["camera"] == "gate"
    assert lines[1]["frames"] == [str(outside[0])] and "pid" not in lines[1]
    back = read_manifest(path)
    assert back == tracklets  # tracklet_id, frames (absolute), modality, camid, pid, timestamp
    assert back[0].extra["split"] == "query" and back[0].extra["meta"] == {"site": "north"}
    assert back[0].extra["camera"] == "gate" and back[0].extra["source"] == f"{path}:1"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_relative_frames_resolve_against_the_manifest_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "m.jsonl"
    path.write_text(
        '{"tracklet_id": "x", "modality": "ir", "camid": 1, "frames": ["../f/1.jpg"]}\n\n'
    )
    (t,) = read_manifest(path)
    assert (
        t.frames == (str(tmp_path.resolve() / "f" / "1.jpg"),) and t.modality == Modality.INFRARED
    )


def test_every_problem_is_listed_with_line_and_field(tmp_path):
    good = {"tracklet_id": "ok", "modality": "visible", "camid": 0, "frames": ["a.jpg"]}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"tracklet_id": "t2", "modality": "visible", "frames": ["a.jpg"]}),
        json.dumps(dict(good, tracklet_id="t3", camid=-1, modality="uv")),
        json.dumps(good),
        json.dumps(dict(good, tracklet_id="t5", frames=[])),
        json.dumps(dict(good, tracklet_id="t6", camId=2, pid="7", split="test")),
        json.dumps(["a list"]),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    expected = [
        ":2: json:",
        ":3: camid: missing",
        ":4: modality: unknown modality 'uv'",
        ":4: camid: must be an integer >= 0, got -1",
        ":5: tracklet_id: 'ok' duplicates line 1",
        ":6: frames: must be a non-empty list",
        ":7: camId: unknown field (did you mean 'camid'?)",
        ":7: pid: must be an integer >= 0",
        ":7: split: must be one of train, query, gallery",
        ":8: line: must be a JSON object",
    ]
    problems = caught.value.problems
    for text in expected:
        assert any(p.startswith(str(path)) and text in p for p in problems), (text, problems)
    assert len(problems) == len(expected)


def test_write_refuses_invalid_tracklets_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.jsonl"
    write_manifest(path, [_tracklet("a", Modality.VISIBLE, 0, ["x.jpg"])])
    before = path.read_text()
    bad = [
        _tracklet("a", Modality.VISIBLE, -2, ["x.jpg"]),
        _tracklet("a", Modality.VISIBLE, 0, ["y.jpg"]),
    ]
    with pytest.raises(ManifestError, match="camid"):
        write_manifest(path, bad)
    assert path.read_text() == before


def test_scan_folder_layout(tmp_path):
    for rel in [
        "7/visible/2/t1/10.jpg",
        "7/visible/2/t1/2.jpg",
        "7/infrared/0/t9/0.png",
        "unknown/ir/1/x/1.jpg",
        "7/visible/2/t1/.DS_Store",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    tracklets = {t.tracklet_id: t for t in scan_folder(tmp_path)}
    assert sorted(tracklets) == ["7/infrared/0/t9", "7/visible/2/t1", "unknown/ir/1/x"]
    t1 = tracklets["7/visible/2/t1"]
    assert [f.rsplit("/", 1)[1] for f in t1.frames] == ["2.jpg", "10.jpg"]  # natural order
    assert (t1.pid, t1.camid, t1.modality) == (7, 2, Modality.VISIBLE)
    assert tracklets["unknown/ir/1/x"].pid is None
    assert tracklets["unknown/ir/1/x"].modality == Modality.INFRARED


def test_scan_folder_lists_every_layout_problem(tmp_path):
    for rel in [
        "bob/visible/1/t/1.jpg",
        "3/uv/1/t/1.jpg",
        "3/visible/cam/t/1.jpg",
        "3/visible/1/t/notes.txt",
        "3/visible/1/readme.md",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "3/visible/1/empty").mkdir()
    with pytest.raises(ManifestError) as caught:
        scan_folder(tmp_path)
    problems = "\n".join(caught.value.problems)
    for text in [
        "bob: pid:",
        "uv: modality:",
        "cam: camid:",
        "notes.txt: frames: not an image",
        "readme.md: layout: expected a <tracklet> folder",
        "empty: frames: tracklet folder holds no images",
    ]:
        assert text in problems
    assert len(caught.value.problems) == 7  # t/ with only notes.txt is also an empty tracklet


def test_manifest_dataset_splits_and_directions(tmp_path):
    tracklets = [
        _tracklet("tr-v", Modality.VISIBLE, 0, ["a.jpg"], pid=30, split="train"),
        _tracklet("tr-i", Modality.INFRARED, 1, ["b.jpg"], pid=30, split="train"),
        _tracklet("tr-v2", Modality.VISIBLE, 2, ["c.jpg"], pid=4, split="train"),
        _tracklet("q-i", Modality.INFRARED, 1, ["d.jpg"], pid=9, split="query"),
        _tracklet("q-v", Modality.VISIBLE, 0, ["e.jpg"], pid=9, split="query"),
        _tracklet("g-v", Modality.VISIBLE, 2, ["f.jpg"], pid=9, split="gallery"),
        _tracklet("g-i", Modality.INFRARED, 5, ["g.jpg"], pid=9, split="gallery"),
        _tracklet("free", Modality.INFRARED, 0, ["h.jpg"]),
    ]
    write_manifest(tmp_path / "manifest.jsonl", tracklets)
    splits = load_manifest_dataset(tmp_path, filter_same_camera=True)
    assert [(t.tracklet_id, t.pid) for t in splits.train] == [
        ("tr-v", 1),
        ("tr-i", 1),
        ("tr-v2", 0),
    ]
    assert splits.num_train_pids == 2 and splits.num_train_cams == 6 and splits.filter_same_camera
    assert [t.tracklet_id for t in splits.query["ir_to_vis"]] == ["q-i"]
    assert [t.tracklet_id for t in splits.gallery["ir_to_vis"]] == ["g-v"]
    assert [t.tracklet_id for t in splits.query["vis_to_ir"]] == ["q-v"]
    assert [t.tracklet_id for t in splits.gallery["vis_to_ir"]] == ["g-i"]
    assert [t.tracklet_id for t in splits.extra["unassigned"]] == ["free"]


def test_manifest_dataset_needs_pids_for_split_tracklets(tmp_path):
    write_manifest(
        tmp_path / "m.jsonl", [_tracklet("q", Modality.VISIBLE, 0, ["a.jpg"], split="query")]
    )
    with pytest.raises(DatasetError, match=r"m.jsonl:1: pid: required for split 'query'"):
        load_manifest_dataset(tmp_path / "m.jsonl")


def test_scan_folder_skips_a_manifest_written_into_the_tree(tmp_path):
    (tmp_path / "7/visible/2/t1").mkdir(parents=True)
    (tmp_path / "7/visible/2/t1/0.jpg").write_bytes(b"")
    write_manifest(tmp_path / "manifest.jsonl", scan_folder(tmp_path))
    assert [t.tracklet_id for t in scan_folder(tmp_path)] == ["7/visible/2/t1"]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ManifestError, match="notes.txt"):
        scan_folder(tmp_path)
