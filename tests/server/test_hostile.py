"""Hostile clients against a real uvicorn server on 127.0.0.1: bounded memory and time per request,
admission control with 503 + Retry-After, slow senders timed out, writes refused from headers.

Every test is bounded: a few connections, sub-second timeouts in the settings, and a hard
deadline on each socket read.
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image
from server_support import TinyGallery, live_server, make_settings, running_client
from vvireid.model.types import Modality
from vvireid.server import service

BIG = 4096


def blank_png(size: int = BIG) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size)).save(buffer, "PNG")
    return buffer.getvalue()


def rss_mb() -> float:
    """This process's resident memory (the live server runs in it, in a thread)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def address(base: str) -> tuple[str, int]:
    url = urlparse(base)
    return url.hostname or "127.0.0.1", int(url.port or 80)


def raw_request(base: str, head: str, body: bytes = b"") -> socket.socket:
    """Open a connection and send ``head`` (and ``body``); the caller reads or keeps it open."""
    sock = socket.create_connection(address(base), timeout=10)
    sock.sendall(head.encode() + body)
    return sock


def read_response(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection or ``timeout`` passes."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
        if b"\r\n\r\n" in data and b"connection: close" not in data.lower():
            break
    return data


def slow_query_head(length: int = 100_000) -> str:
    """Headers of a multipart query whose body will never fully arrive."""
    return (
        "POST /v1/query HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )


def query_files(tracklet) -> dict:
    return {"files": tracklet.files(), "data": {"modality": tracklet.modality.label}}


def test_decode_budget_is_checked_from_headers_before_decoding(tiny_gallery: TinyGallery):
    """64 blank 4096x4096 PNGs (1 MB on the wire, 1 G pixels) get 413 at once, naming the
    limit, and four of them at the same time barely move the server's memory."""
    png = blank_png()
    files = [("frames", (f"{i}.png", png, "image/png")) for i in range(64)]
    with live_server(make_settings(tiny_gallery)) as base, httpx.Client(base_url=base) as http:
        started = time.perf_counter()
        response = http.post("/v1/query", files=files, data={"modality": "ir"}, timeout=30)
        elapsed = time.perf_counter() - started
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["code"] == "decode_budget" and error["part"] == "frames"
        assert "max_request_pixels" in error["message"]
        assert elapsed < 3.0, f"rejecting took {elapsed:.2f} s: pixels were decoded"
        before = rss_mb()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(
                lambda _: http.post("/v1/query", files=files, data={"modality": "ir"},
                                    timeout=30).status_code, range(4)))
        assert statuses == [413] * 4
        # Decoding them would take 4 x 64 x 16 MB = 4 GB; the headers cost next to nothing.
        assert rss_mb() - before < 200, f"RSS grew by {rss_mb() - before:.0f} MB"


def test_too_many_frames_is_422_naming_the_limit(tiny_gallery: TinyGallery):
    with running_client(make_settings(tiny_gallery, max_frames=3)) as client:
        probe = tiny_gallery.of(Modality.INFRARED, 0)
        response = client.post("/v1/query", files=probe.files()[:4], data={"modality": "ir"})
    assert response.status_code == 422  # a declared constraint of the schema (maxItems)
    assert response.json()["error"]["code"] == "too_many_frames"
    assert "max_frames" in response.json()["error"]["message"]


def test_large_frames_decode_at_reduced_size_and_small_ones_do_not():
    """A JPEG far larger than the model needs is decoded in draft mode (to at least twice the
    needed size); an ordinary crop decodes pixel for pixel, as the offline indexer reads it."""
    big = io.BytesIO()
    Image.new("RGB", (2048, 4096), (200, 30, 30)).save(big, "JPEG")
    image = service.probe_frame(big.getvalue(), "frames[0]", "frames[0]", BIG * BIG)
    decoded = service.decode_frame(image, "frames[0]", "frames[0]", needed=(64, 128))
    # Draft mode decodes at 1/8 scale (256x512, the full-size pixels never exist), then a box
    # reduction keeps twice what the model needs.
    assert decoded.size == (128, 256)
    png = io.BytesIO()
    Image.new("L", (1024, 2048), 90).save(png, "PNG")
    image = service.probe_frame(png.getvalue(), "p", "p", BIG * BIG)
    assert service.decode_frame(image, "p", "p", needed=(64, 128)).size == (128, 256)
    small = io.BytesIO()
    Image.new("RGB", (96, 200), (1, 2, 3)).save(small, "PNG")
    image = service.probe_frame(small.getvalue(), "s", "s", BIG * BIG)
    assert service.decode_frame(image, "s", "s", needed=(64, 128)).size == (96, 200)


def test_ordinary_jpeg_frames_decode_to_pils_pixels_through_the_fast_path():
    """An upload decoded with its bytes (libjpeg-turbo) has exactly PIL's pixels, so a query's
    features match the offline indexer's; grey, CMYK and truncated files keep PIL's handling."""
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (200, 96, 3), dtype=np.uint8)
    for mode in ("RGB", "L", "CMYK"):
        out = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(out, "JPEG", quality=85)
        data = out.getvalue()
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        probed = service.probe_frame(data, "frames[0]", "frames[0]", BIG * BIG)
        decoded = service.decode_frame(probed, "frames[0]", "frames[0]", (64, 128), data)
        assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), expected), mode
    cut = data[: len(data) - 40]
    probed = service.probe_frame(cut, "frames[2]", "frames[2] (cut.jpg)", BIG * BIG)
    with pytest.raises(service.InvalidFrameError, match=r"frames\[2\] \(cut.jpg\): truncated"):
        service.decode_frame(probed, "frames[2]", "frames[2] (cut.jpg)", (64, 128), cut)


def test_admission_answers_503_with_retry_after_then_recovers(tiny_gallery: TinyGallery):
    """One slot, one waiting place, a model stuck on the first request: the next request waits
    its admission deadline and gets 503, one more gets 503 at once; when the model answers,
    the next query is served."""

    settings = make_settings(tiny_gallery, max_in_flight=1, queue_size=1, admission_timeout_s=0.5)
    probe = tiny_gallery.of(Modality.INFRARED, 1)
    with running_client(settings) as client:
        encoder = client.app.state.engine.encoder
        real_encode = encoder.encode_prepared
        gate, entered = threading.Event(), threading.Event()

        def stuck_encode(*args, **kwargs):
            entered.set()
            gate.wait(30)
            return real_encode(*args, **kwargs)

        encoder.encode_prepared = stuck_encode

        def timed_post() -> tuple[float, object]:
            started = time.perf_counter()
            response = client.post("/v1/query", **query_files(probe))
            return time.perf_counter() - started, response

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            holder = pool.submit(client.post, "/v1/query", **query_files(probe))
            assert entered.wait(10)
            waiting = pool.submit(timed_post)
            time.sleep(0.15)
            immediate_s, immediate = timed_post()
            waited_s, waited = waiting.result(10)
            gate.set()
            assert holder.result(30).status_code == 200
        encoder.encode_prepared = real_encode
        assert immediate.status_code == 503 and immediate.headers["retry-after"] == "1"
        assert immediate.json()["error"]["code"] == "overloaded"
        assert immediate_s < 0.4, f"a full queue must answer at once, took {immediate_s:.2f} s"
        assert waited.status_code == 503 and "admission_timeout_s" in waited.text
        assert waited.headers["retry-after"] == "1"
        assert 0.4 < waited_s < 2.0
        assert client.post("/v1/query", **query_files(probe)).status_code == 200
        assert "vvireid_queue_rejected_total 2" in client.get("/metrics").text


def test_slow_uploads_hold_no_slot(tiny_gallery: TinyGallery):
    """Three clients stuck mid-upload against a one-slot server: a normal query is still
    served, because a request takes its slot only once its body has arrived."""
    settings = make_settings(tiny_gallery, max_in_flight=1, queue_size=1,
                             admission_timeout_s=0.5, body_timeout_s=30)
    probe = tiny_gallery.of(Modality.INFRARED, 1)
    with live_server(settings) as base, httpx.Client(base_url=base, timeout=10) as http:
        stuck = [raw_request(base, slow_query_head(), b"--b\r\n") for _ in range(3)]
        time.sleep(0.2)
        response = http.post("/v1/query", **query_files(probe))
        for sock in stuck:
            sock.close()
    assert response.status_code == 200, response.text


def test_overload_every_client_answered_quickly(tiny_gallery: TinyGallery):
    """32 concurrent clients against 2 slots: each gets 200 or 503 + Retry-After within 10 s,
    and the server serves the next request at once."""
    settings = make_settings(tiny_gallery, max_in_flight=2, queue_size=4, admission_timeout_s=0.3)
    probe = tiny_gallery.of(Modality.VISIBLE, 2)
    with live_server(settings) as base, httpx.Client(base_url=base, timeout=15) as http:

        def one(_: int) -> tuple[int, float, str | None]:
            started = time.perf_counter()
            response = http.post("/v1/query", **query_files(probe))
            return (response.status_code, time.perf_counter() - started,
                    response.headers.get("retry-after"))

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(one, range(32)))
        statuses = {status for status, _, _ in results}
        assert statuses <= {200, 503}, results
        assert 200 in statuses
        assert all(retry == "1" for status, _, retry in results if status == 503)
        assert max(seconds for _, seconds, _ in results) < 10.0
        started = time.perf_counter()
        assert http.post("/v1/query", **query_files(probe)).status_code == 200
        assert time.perf_counter() - started < 2.0


def test_slow_body_gets_408(tiny_gallery: TinyGallery):
    with live_server(make_settings(tiny_gallery, body_timeout_s=0.5)) as base:
        sock = raw_request(base, slow_query_head(), b"--b\r\n")
        started = time.perf_counter()
        answer = read_response(sock, timeout=5)
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body_timeout_s" in answer
    assert time.perf_counter() - started < 3.0


def test_slow_headers_are_cut_off(tiny_gallery: TinyGallery):
    """Twenty clients that never finish their headers are all disconnected after the header
    timeout, and a normal client is served meanwhile."""
    with live_server(make_settings(tiny_gallery, header_timeout_s=0.5)) as base:
        socks = [raw_request(base, "GET /healthz HTTP/1.1\r\nHost: x\r\n") for _ in range(20)]
        assert httpx.get(base + "/healthz", timeout=5).status_code == 200
        started = time.perf_counter()
        answers = [read_response(sock, timeout=5) for sock in socks]
        elapsed = time.perf_counter() - started
        for sock in socks:
            sock.close()
    assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers), answers[:2]
    assert elapsed < 3.0


def test_unauthorised_write_is_refused_before_its_body(tiny_gallery: TinyGallery, index_copy,
                                                       tmp_path):
    """The 401/403 comes from the headers: the server does not wait for a 50 MB body."""
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    settings = make_settings(tiny_gallery, index=index_copy, api_key_file=key_file)
    with live_server(settings) as base:
        for extra, status in (("", 401), ("X-API-Key: wrong\r\n", 403)):
            head = ("POST /v1/gallery HTTP/1.1\r\nHost: x\r\n"
                    "Content-Type: multipart/form-data; boundary=b\r\n"
                    f"Content-Length: {50 * 1024 * 1024}\r\n{extra}\r\n")
            sock = raw_request(base, head)
            started = time.perf_counter()
            answer = read_response(sock, timeout=5)
            sock.close()
            assert answer.startswith(f"HTTP/1.1 {status}".encode()), answer[:200]
            assert time.perf_counter() - started < 1.0


def test_security_headers_and_no_inline_code(client):
    page = client.get("/")
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["x-frame-options"] == "DENY"
    html = page.text
    assert "<style" not in html and " style=" not in html and " on" not in html.replace(
        " one", "")
    for tag in html.split("<script")[1:]:
        assert tag.split(">")[0].strip().startswith("src="), tag[:80]
        assert tag.split(">", 1)[1].startswith("</script"), "inline script"
    error = client.post("/v1/query", data={"modality": "nope"})
    assert error.headers["x-content-type-options"] == "nosniff"


def test_metrics_can_require_a_key(tiny_gallery: TinyGallery):
    with running_client(make_settings(tiny_gallery, metrics_key="m3tr1cs")) as client:
        assert client.get("/metrics").status_code == 401
        wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["part"] == "Authorization"
        right = client.get("/metrics", headers={"Authorization": "Bearer m3tr1cs"})
        assert right.status_code == 200 and "vvireid_ready 1" in right.text


def test_each_500_is_logged_once_with_its_request_id(tiny_gallery: TinyGallery, monkeypatch,
                                                     caplog: pytest.LogCaptureFixture):
    def broken(self, frames, spec):
        raise RuntimeError("engine bug")

    monkeypatch.setattr(service.QueryEngine, "query", broken)
    probe = tiny_gallery.of(Modality.INFRARED, 0)
    with running_client(make_settings(tiny_gallery)) as client:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            response = client.post("/v1/query", headers={"X-Request-ID": "req-500"},
                                   **query_files(probe))
    assert response.status_code == 500
    assert response.json() == {
        "error": {"code": "internal_error", "part": None,
                  "message": "internal server error; the server log has the details under "
                             "request id req-500"},
        "request_id": "req-500",
    }
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "req-500" in tracebacks[0].getMessage()
