"""The query API on the real app: ranking, modality and camera filters, index facts, thumbnails,
health, readiness and metrics."""

from __future__ import annotations

import io
import threading

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from server_support import TinyGallery, make_settings, running_client, wait_ready
from vvireid.model.types import Modality
from vvireid.server.app import create_app
from vvireid.server.service import QueryEngine

INFRARED, VISIBLE = Modality.INFRARED, Modality.VISIBLE


def query(client: TestClient, tracklet, path: str = "/v1/query", **form):
    data = {"modality": tracklet.modality.label, **{k: str(v) for k, v in form.items()}}
    return client.post(path, files=tracklet.files(), data=data)


def test_query_ranks_gallery_by_score_and_respects_top_k(client, tiny_gallery: TinyGallery):
    probe = tiny_gallery.of(VISIBLE, 2)
    body = query(client, probe, cross_modal="false").json()
    scores = [m["score"] for m in body["matches"]]
    assert [m["rank"] for m in body["matches"]] == [1, 2, 3, 4]
    assert scores == sorted(scores, reverse=True)
    assert body["matches"][0]["tracklet_id"] == probe.tracklet_id  # its own frames come first
    assert body["query"]["frames"] == 6
    assert body["model_fingerprint"] == body["index_fingerprint"]
    assert set(body["timings_ms"]) == {"decode", "queue", "encode", "search", "refine", "total"}
    assert body["timings_ms"]["total"] >= body["timings_ms"]["encode"]

    two = query(client, probe, cross_modal="false", top_k=2).json()["matches"]
    assert [m["tracklet_id"] for m in two] == [m["tracklet_id"] for m in body["matches"][:2]]


def test_query_alias_path_gives_the_same_answer(client, tiny_gallery: TinyGallery):
    probe = tiny_gallery.of(INFRARED, 0)
    a = query(client, probe, path="/query").json()["matches"]
    b = query(client, probe, path="/v1/query").json()["matches"]
    assert [(m["tracklet_id"], round(m["score"], 4)) for m in a] == [
        (m["tracklet_id"], round(m["score"], 4)) for m in b
    ]


def test_infrared_query_searches_visible_gallery_by_default(client, tiny_gallery: TinyGallery):
    body = query(client, tiny_gallery.of(INFRARED, 1)).json()
    assert body["query"]["gallery_modality"] == "visible"
    assert len(body["matches"]) == 4
    assert {m["modality"] for m in body["matches"]} == {"visible"}


def test_visible_query_searches_infrared_and_same_modality_on_request(
    client, tiny_gallery: TinyGallery
):
    probe = tiny_gallery.of(VISIBLE, 3)
    cross = query(client, probe).json()["matches"]
    assert {m["modality"] for m in cross} == {"infrared"}
    same = query(client, probe, cross_modal="false").json()["matches"]
    assert {m["modality"] for m in same} == {"visible"}
    assert same[0]["tracklet_id"] == probe.tracklet_id
    assert same[0]["pid"] == 3 and same[0]["camid"] == probe.camid
    assert same[0]["camera"] == f"camera {probe.camid}"


def test_camera_filter_accepts_comma_lists_and_repeats(client, tiny_gallery: TinyGallery):
    probe = tiny_gallery.of(INFRARED, 0)
    only_cam1 = query(client, probe, camera="1").json()["matches"]
    assert {m["camid"] for m in only_cam1} == {1} and len(only_cam1) == 2
    listed = query(client, probe, camera="0,1").json()["matches"]
    assert {m["camid"] for m in listed} == {0, 1}
    repeated = client.post(
        "/v1/query", files=probe.files(),
        data={"modality": "infrared", "camera": ["0", "1"], "cross_modal": "true"},
    ).json()["matches"]
    assert [m["tracklet_id"] for m in repeated] == [m["tracklet_id"] for m in listed]
    # An infrared camera in a cross-modal (visible) search matches nothing.
    assert query(client, probe, camera="2").json()["matches"] == []


def test_modality_accepts_the_usual_spellings(client, tiny_gallery: TinyGallery):
    probe = tiny_gallery.of(INFRARED, 2)
    response = client.post("/v1/query", files=probe.files(), data={"modality": "IR"})
    assert response.status_code == 200
    assert response.json()["query"]["modality"] == "infrared"


def test_query_camid_is_checked_against_the_model(client, tiny_gallery: TinyGallery):
    # The tiny baseline has no camera embedding: any camid >= 0 is accepted and reported back.
    response = query(client, tiny_gallery.of(INFRARED, 2), camid=7)
    assert response.status_code == 200 and response.json()["query"]["camid"] == 7


def test_index_info_reports_model_index_and_limits(client):
    info = client.get("/v1/index").json()
    assert info["model"]["method"] == "baseline"
    assert info["model"]["seq_len"] == 4
    assert info["index"]["count"] == 8
    assert info["index"]["per_modality"]["infrared"]["count"] == 4
    assert info["limits"]["max_frames"] == 64
    assert "path" not in info["index"]


def test_thumbnail_is_served_by_id(client, tiny_gallery: TinyGallery):
    probe = tiny_gallery.of(VISIBLE, 0)
    url = query(client, probe, cross_modal="false").json()["matches"][0]["thumbnail_url"]
    response = client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG" and image.height > 0


@pytest.mark.parametrize(
    "path",
    [
        "/v1/tracklets/no-such-id/thumbnail",
        "/v1/tracklets/..%2F..%2Fmodel.safetensors/thumbnail",
        "/v1/tracklets/../../etc/passwd/thumbnail",
        "/v1/tracklets/%2Fetc%2Fpasswd/thumbnail",
    ],
)
def test_thumbnail_of_unknown_or_path_like_id_is_404(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "not_found"


def test_health_readiness_and_request_ids(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    echoed = client.get("/healthz", headers={"X-Request-ID": "trace-42"})
    assert echoed.headers["x-request-id"] == "trace-42"
    assert len(client.get("/healthz").headers["x-request-id"]) == 32


def test_metrics_expose_requests_latency_batches_and_queue(client, tiny_gallery: TinyGallery):
    query(client, tiny_gallery.of(INFRARED, 0))
    client.get("/v1/tracklets/no-such-id/thumbnail")
    text = client.get("/metrics").text
    assert 'vvireid_http_requests_total{route="/v1/query",method="POST",status="200"}' in text
    # Unknown ids are counted under the route template, not one series per id.
    assert 'route="/v1/tracklets/{tracklet_id:path}/thumbnail",method="GET",status="404"' in text
    assert 'vvireid_http_request_duration_seconds_bucket{route="/v1/query",le="+Inf"}' in text
    assert "vvireid_batch_size_count" in text
    assert 'vvireid_stage_duration_seconds_count{stage="encode"}' in text
    assert "\nvvireid_queue_depth 0\n" in text
    assert "\nvvireid_gallery_tracklets 8\n" in text
    assert "\nvvireid_ready 1\n" in text


def test_page_and_openapi_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "<form id=\"query-form\"" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    assert client.get("/static/app.js").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/query", "/v1/query", "/v1/gallery", "/v1/index", "/healthz"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200


def test_readyz_is_503_until_the_model_is_loaded(tiny_gallery: TinyGallery, monkeypatch):
    release = threading.Event()
    real_load = QueryEngine.load.__func__

    def gated_load(cls, *args, **kwargs):
        release.wait(30)  # hold the real loader back so the "loading" state can be observed
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(QueryEngine, "load", classmethod(gated_load))
    app = create_app(make_settings(tiny_gallery))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/healthz").status_code == 200
        loading = client.get("/readyz")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        probe = tiny_gallery.of(INFRARED, 0)
        early = query(client, probe)
        assert early.status_code == 503 and early.json()["error"]["code"] == "not_ready"
        release.set()
        wait_ready(client.get)
        assert query(client, probe).status_code == 200


def test_readyz_reports_a_load_failure(tiny_gallery: TinyGallery, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    app = create_app(make_settings(tiny_gallery, checkpoint=broken))
    with TestClient(app, raise_server_exceptions=False) as client:
        for _ in range(200):
            body = client.get("/readyz").json()
            if body["status"] != "loading":
                break
            threading.Event().wait(0.02)
        assert body["status"] == "failed"
        assert "broken.safetensors" in body["detail"]
        assert client.get("/readyz").status_code == 503


def test_index_built_for_another_model_is_refused(tiny_gallery: TinyGallery, tmp_path):
    from vvireid.model.checkpoint import save_checkpoint
    from vvireid.model.config import ModelConfig
    from vvireid.model.factory import create_model

    other = tmp_path / "other.safetensors"
    save_checkpoint(other, create_model(
        ModelConfig(
            "baseline", num_classes=3, backbone="vvireid-tiny", image_size=(64, 32), seq_len=4,
        ),
    ))
    app = create_app(make_settings(tiny_gallery, checkpoint=other))
    with TestClient(app, raise_server_exceptions=False) as client:
        for _ in range(200):
            body = client.get("/readyz").json()
            if body["status"] != "loading":
                break
            threading.Event().wait(0.02)
        assert body["status"] == "failed" and "fingerprint" in body["detail"]


def test_settings_limits_reach_the_engine(tiny_gallery: TinyGallery):
    with running_client(make_settings(tiny_gallery, max_frames=3, default_top_k=2)) as client:
        probe = tiny_gallery.of(VISIBLE, 1)
        too_many = query(client, probe)
        assert too_many.status_code == 422
        assert too_many.json()["error"]["code"] == "too_many_frames"
        files = probe.files()[:3]
        body = client.post("/v1/query", files=files, data={"modality": "visible"}).json()
        assert len(body["matches"]) == 2


def test_similarity_is_the_cosine_in_minus_one_one(client, tiny_gallery: TinyGallery):
    """Own frames: similarity ~1 for the tracklet itself, every value in [-1, 1], also when the
    score is a raw inner product (the tiny baseline's index) or a re-ranked score."""
    probe = tiny_gallery.of(VISIBLE, 3)
    plain = query(client, probe, cross_modal="false").json()["matches"]
    reranked = query(client, probe, cross_modal="false", rerank="true").json()["matches"]
    assert plain[0]["tracklet_id"] == probe.tracklet_id
    assert plain[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    metric = client.get("/v1/index").json()["model"]["similarity"]
    for match in plain:
        assert -1.0 <= match["similarity"] <= 1.0
        if metric == "cosine":
            assert match["similarity"] == pytest.approx(match["score"], abs=1e-6)
    if metric == "inner_product":
        assert plain[0]["score"] > 1.0  # unbounded: the reason similarity exists
    by_id = {m["tracklet_id"]: m["similarity"] for m in plain}
    for match in reranked:
        assert match["similarity"] == pytest.approx(by_id[match["tracklet_id"]], abs=1e-4)
