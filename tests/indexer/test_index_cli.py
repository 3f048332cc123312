"""``vvireid-index`` end to end on synthetic frames with a tiny checkpoint, run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vvireid.indexer import cli
from vvireid.indexer.build import FailureBudget, read_manifest_lenient
from vvireid.indexer.encode import TrackletEncoder
from vvireid.indexer.store import GalleryIndex


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict | None, str]:
    """(exit code, stdout JSON or None, stderr) of one CLI call."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def build(
    capsys, manifest: Path, ckpt: Path, out: Path, *extra: str
) -> tuple[int, dict | None, str]:
    return run(
        capsys,
        "build",
        "--checkpoint",
        ckpt,
        "--gallery",
        manifest,
        "--out",
        out,
        "--no-progress",
        "--batch-size",
        "4",
        "--workers",
        "2",
        *extra,
    )


def frames(manifest: Path, tracklet_id: str) -> list[str]:
    return sorted(str(p) for p in (manifest.parent / tracklet_id).glob("*.jpg"))


def test_build_info_and_search(tmp_path, capsys, make_gallery, checkpoint):
    manifest, ckpt, out = make_gallery(12), checkpoint(), tmp_path / "index"
    code, summary, _ = build(capsys, manifest, ckpt, out)
    assert code == 0
    assert summary["count"] == 12 and summary["added_per_modality"] == {"visible": 6, "infrared": 6}
    assert summary["failure_count"] == 0 and summary["tracklets_per_s"] > 0

    code, info, _ = run(capsys, "info", out)
    assert code == 0 and info["count"] == 12 and info["index_type"] == "flat"
    assert info["per_modality"]["infrared"]["by_camid"] == {"0": 2, "1": 2, "2": 2}
    assert info["per_modality"]["visible"]["camera_names"] == {
        "0": "cam-0",
        "1": "cam-1",
        "2": "cam-2",
    }
    assert info["model_fingerprint"] and info["dim"] > 0 and info["created"]

    search = [
        "search",
        out,
        "--checkpoint",
        ckpt,
        "--modality",
        "infrared",
        "--frames",
        *frames(manifest, "t3"),
    ]
    code, result, _ = run(capsys, *search, "--same-modal", "--camid", "0", "--top-k", "3")
    assert code == 0 and [h["rank"] for h in result["matches"]] == [1, 2, 3]
    assert result["matches"][0]["tracklet_id"] == "t3"  # the query is in the gallery: it comes first
    assert all(h["modality"] == "infrared" for h in result["matches"])

    code, result, _ = run(capsys, *search, "--top-k", "10")  # cross-modal by default
    assert code == 0 and len(result["matches"]) == 6
    assert all(h["modality"] == "visible" for h in result["matches"])

    code, result, _ = run(capsys, *search, "--camera-filter", "1", "2", "--top-k", "10")
    assert code == 0 and {h["camid"] for h in result["matches"]} <= {1, 2} and len(result["matches"]) == 4

    code, _, err = build(capsys, manifest, ckpt, out)
    assert code == 2 and "already holds an index" in err
    code, summary, _ = build(capsys, manifest, ckpt, out, "--overwrite", "--index-type", "ivf")
    assert (
        code == 0 and summary["index_type"] == "flat" and "needs at least" in summary["warnings"][0]
    )


def test_bad_tracklets_are_counted_against_the_budget(tmp_path, capsys, make_gallery, checkpoint):
    manifest, ckpt, out = make_gallery(20), checkpoint(), tmp_path / "index"
    (manifest.parent / "t1" / "0.jpg").write_bytes(b"garbage")  # t1's first frame is sampled
    bad_lines = [
        {
            "tracklet_id": "x-modality",
            "modality": "ultraviolet",
            "camid": 0,
            "frames": ["t0/0.jpg"],
        },
        {
            "tracklet_id": "x-missing",
            "modality": "visible",
            "camid": 0,
            "frames": ["nowhere/0.jpg"],
        },
        {"tracklet_id": "x-empty", "modality": "visible", "camid": 0, "frames": []},
    ]
    with manifest.open("a") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in bad_lines)

    # Default budget, 1% of 23 -> 0: the two bad manifest lines already exceed it, so the run
    # stops before encoding anything.
    code, report, err = build(capsys, manifest, ckpt, out)
    assert code == 1 and "--max-failures" in err
    assert report["failure_count"] == 2 and report["total"] == 23
    failures = {f["tracklet_id"]: f for f in report["failures"]}
    assert (
        failures["x-modality"]["path"] == f"{manifest}:21"
        and "modality" in failures["x-modality"]["reason"]
    )
    assert (
        failures["x-empty"]["path"] == f"{manifest}:23"
        and "frames" in failures["x-empty"]["reason"]
    )
    assert run(capsys, "info", out)[0] == 2  # nothing was written

    code, report, _ = build(capsys, manifest, ckpt, out, "--max-failures", "10%")  # 2 allowed
    assert code == 1 and report["failure_count"] == 4
    failures = {f["tracklet_id"]: f for f in report["failures"]}
    assert (
        failures["t1"]["path"].endswith("t1/0.jpg")
        and "not a readable image" in failures["t1"]["reason"]
    )
    assert (
        failures["x-missing"]["path"].endswith("nowhere/0.jpg")
        and "cannot open" in failures["x-missing"]["reason"]
    )
    assert run(capsys, "info", out)[0] == 2

    code, summary, _ = build(capsys, manifest, ckpt, out, "--max-failures", "4")
    assert code == 0 and summary["count"] == 19 and summary["failure_count"] == 4
    assert summary["resumed"] == 19  # the failed runs had already encoded the good tracklets


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the product catches it."""


def test_interrupted_rebuild_keeps_old_index_and_resumes(
    tmp_path, capsys, make_gallery, checkpoint, monkeypatch
):
    ckpt, out = checkpoint(), tmp_path / "index"
    old = make_gallery(6, name="old")
    assert build(capsys, old, ckpt, out)[0] == 0
    new = make_gallery(24, name="new", start=100, seed=1)

    real = TrackletEncoder.encode_prepared
    encoded: list[int] = []

    def dies_on_third_call(self, clip_sets, camids):
        if len(encoded) == 2:
            raise Killed
        encoded.append(len(clip_sets))
        return real(self, clip_sets, camids)

    monkeypatch.setattr(TrackletEncoder, "encode_prepared", dies_on_third_call)
    with pytest.raises(Killed):
        build(capsys, new, ckpt, out, "--overwrite", "--chunk-size", "4")
    assert sorted(GalleryIndex.open(out).tracklet_ids()) == [f"t{i}" for i in range(6)]  # unchanged

    def counting(self, clip_sets, camids):
        encoded.append(len(clip_sets))
        return real(self, clip_sets, camids)

    encoded.clear()
    monkeypatch.setattr(TrackletEncoder, "encode_prepared", counting)
    code, summary, _ = build(capsys, new, ckpt, out, "--overwrite", "--chunk-size", "4")
    assert code == 0 and summary["resumed"] == 8 and summary["encoded"] == 16
    assert sum(encoded) == 16  # only the tracklets the killed run had not finished
    assert summary["count"] == 24 and not (out / ".build-partial").exists()

    code, fresh, _ = build(capsys, new, ckpt, tmp_path / "fresh", "--chunk-size", "4")
    query = [
        "--checkpoint",
        ckpt,
        "--modality",
        "visible",
        "--frames",
        *frames(new, "t100"),
        "--any-modal",
    ]
    resumed_hits = run(capsys, "search", out, *query)[1]["matches"]
    fresh_hits = run(capsys, "search", tmp_path / "fresh", *query)[1]["matches"]
    assert [h["tracklet_id"] for h in resumed_hits] == [h["tracklet_id"] for h in fresh_hits]
    assert [h["score"] for h in resumed_hits] == pytest.approx(
        [h["score"] for h in fresh_hits], rel=1e-5
    )


def test_add_remove_and_refusals(tmp_path, capsys, make_gallery, checkpoint):
    ckpt, out = checkpoint(), tmp_path / "index"
    assert build(capsys, make_gallery(6, name="first"), ckpt, out)[0] == 0
    more = make_gallery(6, name="more", start=4, seed=2)  # t4, t5 are already indexed
    code, summary, _ = run(
        capsys, "add", out, "--checkpoint", ckpt, "--gallery", more, "--no-progress"
    )
    assert code == 0 and summary["duplicates"] == ["t4", "t5"]
    assert summary["added"] == 4 and summary["count"] == 10

    snapshot = (out / "snapshot.faiss").read_bytes()
    code, result, _ = run(capsys, "remove", out, "--tracklet-id", "t0", "t9")
    assert code == 0 and result["removed"] == 2 and result["count"] == 8
    # A small CLI change is committed, not snapshotted: the next open replays it (no full rewrite).
    assert (out / "snapshot.faiss").read_bytes() == snapshot
    query = [
        "search",
        out,
        "--checkpoint",
        ckpt,
        "--modality",
        "ir",
        "--frames",
        *frames(more, "t9"),
    ]
    hits = run(capsys, *query, "--any-modal", "--top-k", "20")[1]["matches"]
    assert len(hits) == 8 and {"t0", "t9"}.isdisjoint(h["tracklet_id"] for h in hits)

    code, _, err = run(capsys, "remove", out, "--tracklet-id", "t1", "nope")
    assert code == 2 and "nope" in err and "nothing removed" in err
    assert (
        run(capsys, "remove", out, "--tracklet-id", "t1", "nope", "--ignore-missing")[1]["removed"]
        == 1
    )

    other = checkpoint(seed=1)
    code, _, err = run(
        capsys,
        "search",
        out,
        "--checkpoint",
        other,
        "--modality",
        "ir",
        "--frames",
        *frames(more, "t9"),
    )
    assert code == 2 and "built with model" in err and "Traceback" not in err
    code, _, err = run(
        capsys, "add", out, "--checkpoint", other, "--gallery", more, "--no-progress"
    )
    assert code == 2 and "built with model" in err

    database = out / "gallery.sqlite3"
    database.write_bytes(b"not sqlite at all" + database.read_bytes()[17:])
    code, _, err = run(capsys, "info", out)
    assert code == 2 and database.name in err and "not a readable" in err

    code, _, err = run(
        capsys,
        "build",
        "--checkpoint",
        tmp_path / "missing.safetensors",
        "--gallery",
        more,
        "--out",
        tmp_path / "x",
    )
    assert code == 2 and "missing.safetensors" in err


def test_dataset_test_split_indexes_query_and_gallery_once(tmp_path, capsys, checkpoint):
    synth = pytest.importorskip("vvireid.training.data.synth")
    from vvireid.indexer.sources import load_dataset

    root = tmp_path / "vcm"
    synth.synthesize(root, "hitsz-vcm", ids=4, cameras=2, frames=(12, 13), image_size=(64, 32))
    splits = load_dataset("hitsz-vcm", root)
    expected = {
        t.tracklet_id for part in (*splits.query.values(), *splits.gallery.values()) for t in part
    }
    code, summary, _ = run(
        capsys,
        "build",
        "--checkpoint",
        checkpoint(),
        "--gallery",
        root,
        "--format",
        "hitsz-vcm",
        "--out",
        tmp_path / "index",
        "--no-progress",
    )
    assert code == 0 and summary["count"] == len(expected) > 0
    assert set(GalleryIndex.open(tmp_path / "index").tracklet_ids()) == expected


def test_failure_budget_and_lenient_manifest(tmp_path):
    assert FailureBudget.parse("5").allowed(1000) == 5
    assert FailureBudget.parse("1%").allowed(1000) == 10
    assert FailureBudget.parse("0.02").allowed(150) == 3
    with pytest.raises(ValueError, match="--max-failures"):
        FailureBudget.parse("lots")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"tracklet_id": "a", "modality": "ir", "camid": 0, "frames": ["a.jpg"]}\n\n'
        '{"tracklet_id": "b", "modality": "ir", "camId": 0, "frames": ["b.jpg"]}\n'
        "not json\n"
        '{"tracklet_id": "a", "modality": "rgb", "camid": 1, "frames": ["c.jpg"]}\n'
    )
    good, bad = read_manifest_lenient(manifest)
    assert [t.tracklet_id for t in good] == ["a"] and good[0].frames == (str(tmp_path / "a.jpg"),)
    assert [(f.tracklet_id, f.path) for f in bad] == [
        ("b", f"{manifest}:3"),
        (f"{manifest}:4", f"{manifest}:4"),
        ("a", f"{manifest}:5"),
    ]
    assert "camId" in bad[0].reason and "duplicates line 1" in bad[2].reason
