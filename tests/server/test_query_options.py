"""Query options of the server: ``rerank`` and ``min_probability`` form fields, and the
calibrated ``probability`` of each match (from ``<checkpoint>.calibration.json``)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from server_support import TinyGallery, make_settings, running_client
from vvireid.indexer.calibration import Calibration, calibration_path
from vvireid.model.checkpoint import read_checkpoint_metadata
from vvireid.model.types import Modality


def query(client, tracklet, **form):
    data = {"modality": tracklet.modality.label, **{k: str(v) for k, v in form.items()}}
    return client.post("/v1/query", files=tracklet.files(), data=data)


def test_without_calibration_probability_is_null_and_min_probability_is_refused(
    client, tiny_gallery: TinyGallery
):
    probe = tiny_gallery.of(Modality.VISIBLE, 1)
    body = query(client, probe, cross_modal="false").json()
    assert all(m["probability"] is None for m in body["matches"])
    refused = query(client, probe, min_probability=0.5)
    assert refused.status_code == 422
    assert refused.json()["error"]["part"] == "min_probability"
    assert "calibrate" in refused.json()["error"]["message"]
    assert query(client, probe, min_probability=1.5).status_code == 422


def test_rerank_keeps_the_shortlist_and_ranks(client, tiny_gallery: TinyGallery):
    probe = tiny_gallery.of(Modality.INFRARED, 0)
    plain = query(client, probe, top_k=4).json()
    reranked = query(client, probe, top_k=4, rerank="true").json()
    ids = [m["tracklet_id"] for m in reranked["matches"]]
    assert sorted(ids) == sorted(m["tracklet_id"] for m in plain["matches"])
    assert [m["rank"] for m in reranked["matches"]] == [1, 2, 3, 4]
    assert reranked["timings_ms"]["refine"] >= 0
    assert query(client, probe, rerank="maybe").status_code == 422
    # Its own frames stay first after re-ranking in the same modality.
    own = query(client, probe, cross_modal="false", rerank="true").json()["matches"]
    assert own[0]["tracklet_id"] == probe.tracklet_id


def test_calibrated_server_gives_probabilities_and_filters(tiny_gallery: TinyGallery, tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    shutil.copy(tiny_gallery.checkpoint, checkpoint)
    probe = tiny_gallery.of(Modality.VISIBLE, 3)
    fingerprint = read_checkpoint_metadata(checkpoint)["fingerprint"]
    with running_client(make_settings(tiny_gallery, checkpoint=checkpoint)) as client:
        scores = [m["score"] for m in query(client, probe, cross_modal="false").json()["matches"]]
    middle = float(np.median(scores))
    Calibration(40.0, -40.0 * middle, fingerprint).save(calibration_path(checkpoint))
    with running_client(make_settings(tiny_gallery, checkpoint=checkpoint)) as client:
        matches = query(client, probe, cross_modal="false").json()["matches"]
        probabilities = [m["probability"] for m in matches]
        assert all(p is not None for p in probabilities)
        assert probabilities == sorted(probabilities, reverse=True)
        assert probabilities[0] > 0.5 > probabilities[-1]
        kept = query(client, probe, cross_modal="false", min_probability=0.5).json()["matches"]
        assert [m["tracklet_id"] for m in kept] == [
            m["tracklet_id"] for m in matches if m["probability"] >= 0.5
        ]
        assert all(m["probability"] == pytest.approx(
            next(x["probability"] for x in matches if x["tracklet_id"] == m["tracklet_id"]))
            for m in kept)
