"""Gallery writes: API-key enforcement, add -> query -> delete, and persistence on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_support import (
    TinyGallery,
    encode_image,
    make_settings,
    running_client,
    synthetic_frame,
)
from vvireid.indexer.store import GalleryIndex
from vvireid.model.types import Modality

KEY = "s3cret-key-for-tests"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "api.key"
    path.write_text(KEY + "\n")
    return path


def new_tracklet_files(pid: int = 9) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Frames of a person the gallery has never seen (infrared, PNG)."""
    return [
        ("frames", (f"{f:03d}.png", encode_image(synthetic_frame(pid, Modality.INFRARED, f), "PNG"),
                    "image/png"))
        for f in range(5)
    ]


def add_form(**extra) -> dict[str, str]:
    return {"modality": "infrared", "camid": "3", "camera": "north gate", "pid": "9",
            "tracklet_id": "night-0009", **extra}


def test_writes_are_disabled_without_a_configured_key(client):
    response = client.post("/v1/gallery", files=new_tracklet_files(), data=add_form())
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "writes_disabled" and "--api-key-file" in error["message"]
    assert client.delete("/v1/gallery/vis-p0-c0", headers={"X-API-Key": "x"}).status_code == 403


def test_missing_or_wrong_key_is_refused(tiny_gallery: TinyGallery, index_copy, key_file):
    with running_client(make_settings(tiny_gallery, index=index_copy,
                                      api_key_file=key_file)) as client:
        missing = client.post("/v1/gallery", files=new_tracklet_files(), data=add_form())
        assert missing.status_code == 401 and missing.json()["error"]["part"] == "X-API-Key"
        wrong = client.post("/v1/gallery", files=new_tracklet_files(), data=add_form(),
                            headers={"X-API-Key": "guess"})
        assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
        gone = client.delete("/v1/gallery/vis-p0-c0", headers={"X-API-Key": "guess"})
        assert gone.status_code == 403
        assert len(GalleryIndex.open(index_copy)) == 8  # nothing changed


def test_add_query_delete_round_trip_is_persisted(
    tiny_gallery: TinyGallery, index_copy, key_file
):
    auth = {"X-API-Key": KEY}
    settings = make_settings(tiny_gallery, index=index_copy, api_key_file=key_file)
    with running_client(settings) as client:
        added = client.post("/v1/gallery", files=new_tracklet_files(), data=add_form(),
                            headers=auth)
        assert added.status_code == 201, added.text
        body = added.json()
        assert body["added"]["tracklet_id"] == "night-0009"
        assert body["added"]["frames"] == 5 and body["index_size"] == 9
        assert body["index_version"] == 1

        # On disk before the answer: a fresh reader sees the tracklet and its metadata.
        reopened = GalleryIndex.open(index_copy)
        item = reopened.get("night-0009")
        assert item is not None and item.modality == Modality.INFRARED
        assert (item.camid, item.camera, item.pid) == (3, "north gate", 9)
        assert reopened.thumbnail("night-0009")[:2] == b"\xff\xd8"  # a JPEG

        query = client.post("/v1/query", files=new_tracklet_files(),
                            data={"modality": "infrared", "cross_modal": "false"})
        top = query.json()["matches"][0]
        assert top["tracklet_id"] == "night-0009" and top["pid"] == 9
        assert query.json()["index_version"] == 1
        assert client.get(top["thumbnail_url"]).status_code == 200

        duplicate = client.post("/v1/gallery", files=new_tracklet_files(), data=add_form(),
                                headers=auth)
        assert duplicate.status_code == 409
        assert duplicate.json()["error"]["part"] == "tracklet_id"

        deleted = client.delete("/v1/gallery/night-0009", headers=auth)
        assert deleted.status_code == 200 and deleted.json()["index_size"] == 8
        after = client.post("/v1/query", files=new_tracklet_files(),
                            data={"modality": "infrared", "cross_modal": "false"}).json()
        assert "night-0009" not in [m["tracklet_id"] for m in after["matches"]]
        assert client.get("/v1/tracklets/night-0009/thumbnail").status_code == 404
        assert client.delete("/v1/gallery/night-0009", headers=auth).status_code == 404

    reopened = GalleryIndex.open(index_copy)
    assert "night-0009" not in reopened and len(reopened) == 8


def test_add_generates_an_id_and_validates_fields(tiny_gallery: TinyGallery, index_copy,
                                                  key_file):
    auth = {"X-API-Key": KEY}
    with running_client(make_settings(tiny_gallery, index=index_copy,
                                      api_key_file=key_file)) as client:
        form = {"modality": "visible", "camid": "1"}
        response = client.post("/v1/gallery", files=new_tracklet_files(), data=form, headers=auth)
        assert response.status_code == 201
        assert response.json()["added"]["tracklet_id"].startswith("api-")

        bad_id = client.post("/v1/gallery", files=new_tracklet_files(),
                             data=add_form(tracklet_id="../../etc/passwd"), headers=auth)
        assert bad_id.status_code == 422 and bad_id.json()["error"]["part"] == "tracklet_id"
        no_camid = client.post("/v1/gallery", files=new_tracklet_files(),
                               data={"modality": "visible"}, headers=auth)
        assert no_camid.status_code == 422 and no_camid.json()["error"]["part"] == "camid"
        bad_frame = client.post("/v1/gallery", files=[("frames", ("a.jpg", b"xx", "image/jpeg"))],
                                data=add_form(), headers=auth)
        assert bad_frame.status_code == 422
        assert bad_frame.json()["error"]["part"] == "frames[0]"
    assert len(GalleryIndex.open(index_copy)) == 9  # only the valid add landed


def test_api_key_from_environment(tiny_gallery: TinyGallery, index_copy):
    from vvireid.server.settings import ServerSettings

    settings = ServerSettings.from_env(
        {"VVIREID_CHECKPOINT": str(tiny_gallery.checkpoint), "VVIREID_INDEX": str(index_copy),
         "VVIREID_API_KEY": KEY, "VVIREID_DEVICE": "cpu"}
    )
    with running_client(settings) as client:
        response = client.delete("/v1/gallery/vis-p1-c1", headers={"X-API-Key": KEY})
        assert response.status_code == 200
    assert "vis-p1-c1" not in GalleryIndex.open(index_copy)
