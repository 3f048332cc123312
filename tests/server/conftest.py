"""Server fixtures: the tiny gallery (built once per session) and a read-only running server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_support import TinyGallery, build_tiny_gallery, make_settings, running_client


@pytest.fixture(scope="session")
def tiny_gallery(tmp_path_factory: pytest.TempPathFactory) -> TinyGallery:
    return build_tiny_gallery(tmp_path_factory.mktemp("server-gallery"))


@pytest.fixture
def index_copy(tiny_gallery: TinyGallery, tmp_path: Path) -> Path:
    """A private copy of the gallery index for tests that write to it."""
    target = tmp_path / "index"
    shutil.copytree(tiny_gallery.index, target)
    return target


@pytest.fixture(scope="module")
def client(tiny_gallery: TinyGallery) -> Iterator[TestClient]:
    """A server over the shared gallery; tests must not write through it."""
    with running_client(make_settings(tiny_gallery)) as client:
        yield client
