"""The server on a live gallery: other writers' commits appear, a failed write changes nothing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from server_support import make_settings, running_client
from vvireid.indexer.store import GalleryIndex

KEY = "live-gallery-test-key"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "api.key"
    path.write_text(KEY + "\n")
    return path


def _size(client) -> tuple[int, int]:
    index = client.get("/v1/index").json()["index"]
    return index["size"], index["version"]


def test_a_removal_by_another_writer_reaches_the_running_server(tiny_gallery, index_copy):
    """What ``vvireid-index remove`` does while the server runs: no restart, no divergence."""
    with running_client(make_settings(tiny_gallery, index=index_copy)) as client:
        assert _size(client) == (8, 0)
        other = GalleryIndex.open(index_copy, device="cpu")  # its own database connection
        other.remove(["vis-p1-c1"])
        other.close()
        deadline = time.monotonic() + 10
        while _size(client)[0] != 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _size(client) == (7, 1)
        assert client.get("/v1/tracklets/vis-p1-c1/thumbnail").status_code == 404


def test_a_delete_that_cannot_commit_leaves_memory_equal_to_disk(
    tiny_gallery, index_copy, key_file
):
    """The database refuses the write: the answer is an error, the count stays, a retry still
    finds the tracklet, and a fresh open agrees with the server."""
    settings = make_settings(tiny_gallery, index=index_copy, api_key_file=key_file)
    auth = {"X-API-Key": KEY}
    with running_client(settings) as client:
        engine = client.app.state.engine
        engine.index._db().execute("PRAGMA query_only=ON")  # as a read-only file system would
        failed = client.delete("/v1/gallery/vis-p1-c1", headers=auth)
        assert failed.status_code >= 500 and "read-only" in failed.text
        assert _size(client) == (8, 0)
        again = client.delete("/v1/gallery/vis-p1-c1", headers=auth)
        assert again.status_code == failed.status_code  # still there, not a 404
        engine.index._db().execute("PRAGMA query_only=OFF")
        assert client.delete("/v1/gallery/vis-p1-c1", headers=auth).status_code == 200
        assert _size(client) == (7, 1)
    assert len(GalleryIndex.open(index_copy)) == 7
