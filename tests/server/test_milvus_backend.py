"""The server on a Milvus gallery (real Milvus Lite): queries, a lost connection answered with 503
and Retry-After then recovered, and an unreachable Milvus at start reported by /readyz."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_support import TinyGallery, make_settings, running_client
from vvireid.indexer.encode import TrackletEncoder
from vvireid.indexer.gallery import BackendOptions
from vvireid.indexer.milvus import build_milvus
from vvireid.model.checkpoint import load_checkpoint
from vvireid.model.types import Modality, Tracklet
from vvireid.server.app import create_app


@pytest.fixture
def milvus_settings(tiny_gallery: TinyGallery, tmp_path: Path):
    uri = str(tmp_path / "gallery.db")
    encoder = TrackletEncoder(load_checkpoint(tiny_gallery.checkpoint), device="cpu")
    tracklets = [
        Tracklet(t.tracklet_id, tuple(str(p) for p in t.frames), t.modality, t.camid, t.pid)
        for t in tiny_gallery.tracklets.values()
    ]
    build_milvus(BackendOptions("milvus", uri), "served", encoder, tracklets)
    return make_settings(tiny_gallery, backend="milvus", milvus_uri=uri, index=Path("served"))


def _query(client: TestClient, tracklet):
    data = {"modality": tracklet.modality.label, "cross_modal": "false"}
    return client.post("/v1/query", files=tracklet.files(), data=data)


def test_queries_a_milvus_gallery_and_survives_losing_it(milvus_settings, tiny_gallery):
    probe = tiny_gallery.of(Modality.VISIBLE, 1)
    with running_client(milvus_settings) as client:
        body = _query(client, probe).json()
        assert body["matches"][0]["tracklet_id"] == probe.tracklet_id
        assert all(m["modality"] == "visible" for m in body["matches"])
        assert client.get("/v1/index").json()["index"]["count"] == len(tiny_gallery.tracklets)

        client.app.state.engine.index._client.close()  # the connection to Milvus is lost
        lost = _query(client, probe)
        assert lost.status_code == 503, lost.text
        assert lost.headers["Retry-After"] == "5"
        assert lost.json()["error"]["code"] == "gallery_unavailable"

        again = _query(client, probe)  # Milvus is back: the gallery reconnects
        assert again.status_code == 200
        assert again.json()["matches"][0]["tracklet_id"] == probe.tracklet_id


def test_unreachable_milvus_at_start_keeps_readiness_false(tiny_gallery):
    settings = make_settings(
        tiny_gallery, backend="milvus", milvus_uri="http://127.0.0.1:9", milvus_timeout_s=2
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready = client.get("/readyz")
            if ready.json()["status"] == "failed":
                break
            time.sleep(0.05)
        assert ready.status_code == 503
        assert "http://127.0.0.1:9" in ready.json()["detail"]
