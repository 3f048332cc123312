"""Rank lists worth looking at: per-query AP, query choice (worst/best/random/ids, failures
first), both directions, the CMC legend with mAP; and ``eval --rerank``."""

import json

import numpy as np
import pytest
from PIL import Image
from vvireid.model.checkpoint import save_checkpoint
from vvireid.model.config import ModelConfig
from vvireid.model.factory import create_model
from vvireid.model.types import Modality, Tracklet
from vvireid.training.cli import main
from vvireid.training.evaluation import evaluate
from vvireid.training.report import (
    DirectionResult,
    draw_cmc,
    draw_ranklist,
    query_average_precision,
    select_queries,
)


def direction(tmp_path, seed: int = 0, filter_cam: bool = False) -> DirectionResult:
    rng = np.random.default_rng(seed)
    frame = tmp_path / "f.png"
    Image.new("RGB", (16, 32), (90, 90, 90)).save(frame)
    query = [Tracklet(f"q{i}", (str(frame),), Modality.INFRARED, i % 2, pid=i) for i in range(6)]
    gallery = [Tracklet(f"g{j}", (str(frame),), Modality.VISIBLE, j // 6, pid=j % 6)
               for j in range(18)]
    distmat = rng.normal(size=(6, 18))
    result = evaluate(distmat, [t.pid for t in query], [t.pid for t in gallery],
                      [t.camid for t in query], [t.camid for t in gallery],
                      filter_same_camera=filter_cam, max_rank=10)
    return DirectionResult(result, distmat, query, gallery)


@pytest.mark.parametrize("filter_cam", [False, True])
def test_query_ap_averages_to_the_metric_map(tmp_path, filter_cam):
    d = direction(tmp_path, filter_cam=filter_cam)
    aps = [query_average_precision(d, qi, filter_cam) for qi in range(len(d.query))]
    assert np.mean([a for a in aps if a is not None]) == pytest.approx(d.result.mAP, abs=1e-6)


def test_query_choices(tmp_path):
    d = direction(tmp_path, seed=1)
    aps = {qi: query_average_precision(d, qi, False) for qi in range(6)}
    worst = select_queries(d, "worst", 3, False)
    best = select_queries(d, "best", 3, False)
    assert set(worst) == set(sorted(aps, key=aps.get)[:3])
    assert set(best) == set(sorted(aps, key=aps.get)[-3:])

    def failed(qi: int) -> bool:
        return d.gallery[int(np.argmin(d.distmat[qi]))].pid != d.query[qi].pid

    for picked in (worst, best, select_queries(d, "random", 4, False)):
        flags = [failed(qi) for qi in picked]
        assert flags == sorted(flags, reverse=True)  # failures first
    assert set(select_queries(d, "q4,q1", 9, False)) == {4, 1}
    with pytest.raises(ValueError, match="nope"):
        select_queries(d, "q1,nope", 2, False)


def test_ranklist_and_cmc_pictures(tmp_path):
    directions = {"ir_to_vis": direction(tmp_path, 2), "vis_to_ir": direction(tmp_path, 3)}
    path = tmp_path / "ranklist.png"
    draw_ranklist(directions, path, num_queries=2, top_k=5, queries="worst")
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape[0] > 2 * 2 * 96  # 2 directions x 2 queries
    assert ((pixels == (220, 0, 0)).all(axis=2)).any()  # the worst queries show wrong matches
    draw_cmc({k: d.result.cmc for k, d in directions.items()}, tmp_path / "cmc.png",
             maps={k: d.result.mAP for k, d in directions.items()})
    assert Image.open(tmp_path / "cmc.png").size == (640, 420)


def test_eval_cli_rerank_and_vis_queries(vcm, tmp_path, capsys):
    model = create_model(ModelConfig("baseline", 4, backbone="vvireid-tiny", image_size=(64, 32),
                                     seq_len=4, num_cameras=2))
    checkpoint = tmp_path / "model.safetensors"
    save_checkpoint(checkpoint, model, {"data_format": "hitsz-vcm"})
    rc = main(["eval", "--checkpoint", str(checkpoint), "--data-root", str(vcm), "--out",
               str(tmp_path / "eval"), "--device", "cpu", "--rerank",
               "--vis-queries", "best", "--vis-num", "2"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rerank"]["k1"] == 20 and set(report["rerank"]["without_rerank"]) == set(
        report["directions"])
    assert Image.open(tmp_path / "eval" / "ranklist.png").format == "PNG"
    rc = main(["eval", "--checkpoint", str(checkpoint), "--data-root", str(vcm), "--out",
               str(tmp_path / "eval2"), "--device", "cpu",
               "--vis-queries", "no-such-query"])
    assert rc == 2 and "--vis-queries" in capsys.readouterr().err
