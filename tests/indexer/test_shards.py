"""Sharded builds: ``vvireid-index build --shard I/N`` on a tiny manifest, for both backends.

A sharded build must index exactly what a single build indexes (same ids, same vectors, so the
same exact search results), each shard must encode a disjoint slice, and a rerun must resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vvireid.indexer import cli
from vvireid.indexer.build import parse_shard, select_shard
from vvireid.model.types import Modality, Tracklet

N = 10


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, dict | None, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def build(capsys, manifest: Path, ckpt: Path, out: object, *extra: object):
    return run(
        capsys, "build", "--checkpoint", ckpt, "--gallery", manifest, "--out", out,
        "--no-progress", "--batch-size", "4", "--workers", "1", *extra,
    )


def search(capsys, index: object, manifest: Path, ckpt: Path, *extra: object) -> list[tuple]:
    frames = sorted(str(p) for p in (manifest.parent / "t3").glob("*.jpg"))
    code, result, err = run(
        capsys, "search", index, "--checkpoint", ckpt, "--modality", "infrared", "--top-k", "4",
        "--frames", *frames, *extra,
    )
    assert code == 0, err
    return [(h["tracklet_id"], round(h["score"], 4)) for h in result["matches"]]


def _tracklets(n: int) -> list[Tracklet]:
    return [Tracklet(f"id-{i}", (f"{i}.jpg",), Modality.VISIBLE, 0) for i in range(n)]


def test_shards_are_disjoint_deterministic_and_cover_everything() -> None:
    tracklets = _tracklets(300)
    shards = [select_shard(tracklets, i, 4) for i in range(4)]
    ids = [t.tracklet_id for shard in shards for t in shard]
    assert sorted(ids) == sorted(t.tracklet_id for t in tracklets)  # every one exactly once
    assert all(40 < len(shard) < 110 for shard in shards)  # a hash spreads them
    assert select_shard(tracklets[::-1], 2, 4) == shards[2][::-1]  # by id, not by position
    assert select_shard(tracklets, 0, 1) == tracklets


@pytest.mark.parametrize("text", ["3", "2/2", "-1/3", "a/b", "1/0"])
def test_bad_shard_spec(text: str) -> None:
    with pytest.raises(ValueError, match="--shard"):
        parse_shard(text)


def test_faiss_shards_merge_into_the_single_build(tmp_path, capsys, make_gallery, checkpoint):
    manifest, ckpt = make_gallery(N), checkpoint()
    code, whole, err = build(capsys, manifest, ckpt, tmp_path / "whole")
    assert code == 0, err
    counts = []
    for i in range(2):
        code, summary, err = build(capsys, manifest, ckpt, tmp_path / f"s{i}", "--shard", f"{i}/2")
        assert code == 0, err
        counts.append(summary["count"])
    assert sum(counts) == N and min(counts) > 0

    code, summary, err = build(capsys, manifest, ckpt, tmp_path / "s0", "--shard", "0/2")
    assert code == 0 and summary["encoded"] == 0 and summary["count"] == counts[0]  # resumed

    code, merged, err = run(capsys, "merge", tmp_path / "merged", tmp_path / "s0", tmp_path / "s1")
    assert code == 0, err
    assert merged["count"] == N
    assert search(capsys, tmp_path / "merged", manifest, ckpt) == search(
        capsys, tmp_path / "whole", manifest, ckpt
    )

    code, _, err = run(capsys, "merge", tmp_path / "twice", tmp_path / "s0", tmp_path / "s0")
    assert code == 2 and "in two shards" in err


def test_milvus_shards_fill_one_collection(tmp_path, capsys, make_gallery, checkpoint):
    manifest, ckpt = make_gallery(N), checkpoint()
    db = tmp_path / "milvus.db"
    milvus = ("--backend", "milvus", "--milvus-uri", db)
    code, whole, err = build(capsys, manifest, ckpt, "whole", *milvus)  # one unsharded build
    assert code == 0 and whole["count"] == N, err
    counts = []
    for i in range(2):
        code, summary, err = build(capsys, manifest, ckpt, "gallery", "--shard", f"{i}/2", *milvus)
        assert code == 0, err
        counts.append(summary["added"])
    assert sum(counts) == N and summary["count"] == N

    code, summary, err = build(capsys, manifest, ckpt, "gallery", "--shard", "1/2", *milvus)
    assert code == 0 and summary["encoded"] == 0 and summary["resumed"] == counts[1]

    code, info, err = run(capsys, "info", "gallery", *milvus)
    assert code == 0 and info["count"] == N and info["backend"] == "milvus"
    assert search(capsys, "gallery", manifest, ckpt, *milvus) == search(
        capsys, "whole", manifest, ckpt, *milvus
    )

    other = checkpoint(seed=1)
    code, _, err = run(
        capsys, "search", "gallery", "--checkpoint", other, "--modality", "visible",
        "--frames", *sorted(str(p) for p in (manifest.parent / "t0").glob("*.jpg")), *milvus,
    )
    assert code == 2 and "fingerprint" in err and str(db) in err

    code, result, err = run(capsys, "remove", "gallery", "--tracklet-id", "t1", "nope", *milvus)
    assert code == 2 and "nope" in err
    code, result, err = run(capsys, "remove", "gallery", "--tracklet-id", "t1", *milvus)
    assert code == 0 and result["removed"] == 1 and result["count"] == N - 1


def test_add_to_a_milvus_collection_skips_stored_ids(tmp_path, capsys, make_gallery, checkpoint):
    manifest, ckpt = make_gallery(N), checkpoint()
    milvus = ("--backend", "milvus", "--milvus-uri", tmp_path / "milvus.db")
    code, first, err = build(capsys, manifest, ckpt, "gallery", "--shard", "0/2", *milvus)
    assert code == 0 and 0 < first["count"] < N, err
    code, added, err = run(
        capsys, "add", "gallery", "--checkpoint", ckpt, "--gallery", manifest, "--no-progress",
        *milvus,
    )
    assert code == 0, err
    assert added["command"] == "add" and added["count"] == N
    assert added["added"] == N - first["count"]
