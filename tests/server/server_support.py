"""Helpers of the server tests: a tiny checkpoint and gallery index made by the real pipeline,
and context managers that run the real app (``TestClient`` with its lifespan, or uvicorn on a
loopback port).

The gallery holds 4 identities, each seen once by a visible camera (camid 0 or 1, JPEG frames)
and once by an infrared camera (camid 2 or 3, grayscale PNG frames). The model has random
weights, so only exact self-matches are meaningful: posting a gallery tracklet's own frames
must return that tracklet first with score ~1.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from vvireid.indexer.build import build_index
from vvireid.indexer.encode import TrackletEncoder
from vvireid.model.checkpoint import load_checkpoint, save_checkpoint
from vvireid.model.config import ModelConfig
from vvireid.model.factory import create_model
from vvireid.model.types import Modality, Tracklet
from vvireid.server.app import create_app, uvicorn_config
from vvireid.server.settings import ServerSettings

NUM_PIDS = 4
FRAMES_PER_TRACKLET = 6
TINY_IMAGE_SIZE = (64, 32)  # model input (H, W), as in tests/conftest.py
FRAME_SIZE = (24, 48)  # PIL (width, height): re-ID crops are tall


@dataclass(frozen=True)
class GalleryTracklet:
    tracklet_id: str
    modality: Modality
    camid: int
    pid: int
    frames: tuple[Path, ...]

    def files(self, field: str = "frames") -> list[tuple[str, tuple[str, bytes, str]]]:
        """The frames as an httpx ``files=`` list, in temporal order."""
        mime = "image/png" if self.frames[0].suffix == ".png" else "image/jpeg"
        return [(field, (p.name, p.read_bytes(), mime)) for p in self.frames]


@dataclass(frozen=True)
class TinyGallery:
    checkpoint: Path
    index: Path
    tracklets: dict[str, GalleryTracklet]

    def of(self, modality: Modality, pid: int) -> GalleryTracklet:
        return next(t for t in self.tracklets.values() if t.modality == modality and t.pid == pid)


def synthetic_frame(pid: int, modality: Modality, frame: int) -> Image.Image:
    """A person-like blob pattern per pid, a little noise per frame; infrared is grayscale."""
    rng = np.random.default_rng(1000 * pid + 10 * int(modality) + frame)
    base = np.random.default_rng(pid).integers(0, 256, size=(4, 2, 3))
    blocks = np.kron(base, np.ones((FRAME_SIZE[1] // 4, FRAME_SIZE[0] // 2, 1)))
    pixels = np.clip(blocks + rng.normal(0, 12, blocks.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    return image.convert("L") if modality is Modality.INFRARED else image


def encode_image(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def write_tracklets(root: Path) -> list[GalleryTracklet]:
    tracklets = []
    for pid in range(NUM_PIDS):
        for modality in Modality:
            camid = pid % 2 + (2 if modality is Modality.INFRARED else 0)
            tracklet_id = f"{modality.label[:3]}-p{pid}-c{camid}"
            folder = root / tracklet_id
            folder.mkdir(parents=True)
            suffix = "png" if modality is Modality.INFRARED else "jpg"
            paths = []
            for f in range(FRAMES_PER_TRACKLET):
                path = folder / f"{f:03d}.{suffix}"
                synthetic_frame(pid, modality, f).save(path)
                paths.append(path)
            tracklets.append(GalleryTracklet(tracklet_id, modality, camid, pid, tuple(paths)))
    return tracklets


def build_tiny_gallery(root: Path) -> TinyGallery:
    """Checkpoint + index made by the real pipeline (save_checkpoint, build_index)."""
    model = create_model(
        ModelConfig(
            "baseline", num_classes=NUM_PIDS, backbone="vvireid-tiny", image_size=TINY_IMAGE_SIZE,
            seq_len=4,
        ),
    )
    checkpoint = root / "model.safetensors"
    save_checkpoint(checkpoint, model)
    tracklets = write_tracklets(root / "frames")
    encoder = TrackletEncoder(load_checkpoint(checkpoint), device="cpu")
    build_index(
        root / "index",
        encoder,
        [
            Tracklet(t.tracklet_id, tuple(str(p) for p in t.frames), t.modality, t.camid, t.pid,
                     extra={"camera": f"camera {t.camid}"})
            for t in tracklets
        ],
    )
    return TinyGallery(checkpoint, root / "index", {t.tracklet_id: t for t in tracklets})


def make_settings(gallery: TinyGallery, **overrides) -> ServerSettings:
    values = {"checkpoint": gallery.checkpoint, "index": gallery.index, "device": "cpu",
              "worker_threads": 8}
    values.update(overrides)
    return ServerSettings(**values)


def wait_ready(get, timeout: float = 60.0) -> None:
    """Poll /readyz until 200 (fails the test on a load failure or a timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = get("/readyz")
        if response.status_code == 200:
            return
        if response.json().get("status") == "failed":
            pytest.fail(f"server failed to load: {response.json()['detail']}")
        time.sleep(0.02)
    pytest.fail("server not ready in time")


@contextlib.contextmanager
def running_client(settings: ServerSettings) -> Iterator[TestClient]:
    """The real app with its lifespan (model and index loaded), ready for requests."""
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client.get)
        yield client


@contextlib.contextmanager
def live_server(settings: ServerSettings) -> Iterator[str]:
    """Run the app under uvicorn on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        with httpx.Client(base_url=base, timeout=10) as http:
            wait_ready(http.get)
        yield base
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()

