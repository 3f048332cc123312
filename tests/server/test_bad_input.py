"""Bad requests get a 4xx JSON error naming the part at fault, and never break the server."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from server_support import TinyGallery, make_settings, running_client, synthetic_frame
from vvireid.model.types import Modality

BOUNDARY = "vvireid-test-boundary"


def frame_bytes(fmt: str = "JPEG", size: tuple[int, int] = (24, 48)) -> bytes:
    buffer = io.BytesIO()
    synthetic_frame(0, Modality.VISIBLE, 0).resize(size).save(buffer, fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries almost no pixel data (a "bomb" header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def good_frames(n: int = 4) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("frames", (f"{i:03d}.jpg", frame_bytes(), "image/jpeg")) for i in range(n)]


def post(client, files, **data):
    form = {"modality": "infrared", **{k: str(v) for k, v in data.items()}}
    return client.post("/v1/query", files=files, data=form)


def assert_error(response, status: int, code: str, part: str | None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["part"] == part, body
    assert body["request_id"] and body["request_id"] == response.headers["x-request-id"]
    return body["error"]


def with_bad_frame(position: int, name: str, data: bytes, mime: str = "image/jpeg"):
    files = good_frames(4)
    files[position] = ("frames", (name, data, mime))
    return files


def test_no_frames(client):
    error = assert_error(post(client, None), 422, "no_frames", "frames")
    assert "frames" in error["message"]


def test_too_many_frames(client):
    error = assert_error(post(client, good_frames(65)), 422, "too_many_frames", "frames")
    assert "65" in error["message"] and "64" in error["message"]
    assert "max_frames" in error["message"]


def test_non_image_file_is_named(client):
    files = with_bad_frame(2, "notes.txt", b"this is not an image", "text/plain")
    error = assert_error(post(client, files), 422, "invalid_frame", "frames[2]")
    assert error["message"].startswith("frames[2] (notes.txt): not a readable image")


def test_empty_file(client):
    error = assert_error(post(client, with_bad_frame(0, "a.jpg", b"")), 422, "invalid_frame",
                         "frames[0]")
    assert "empty" in error["message"]


def test_truncated_jpeg(client):
    data = frame_bytes("JPEG", (96, 192))
    files = with_bad_frame(1, "cut.jpg", data[: len(data) // 2])
    error = assert_error(post(client, files), 422, "invalid_frame", "frames[1]")
    assert "cut.jpg" in error["message"] and "truncated or corrupt" in error["message"]


def test_corrupt_png_in_a_frame_sampling_would_skip(client):
    # With 4 frames and seq_len 4 every frame is used; with 9, rrs_test skips some. A corrupt
    # frame is an error either way.
    data = bytearray(frame_bytes("PNG"))
    data[60:80] = b"\xff" * 20  # inside IDAT: CRC and zlib stream broken
    files = good_frames(9)
    files[7] = ("frames", ("broken.png", bytes(data), "image/png"))
    error = assert_error(post(client, files), 422, "invalid_frame", "frames[7]")
    assert "broken.png" in error["message"]


def test_unsupported_format_is_refused(client):
    files = with_bad_frame(3, "anim.gif", frame_bytes("GIF"), "image/gif")
    error = assert_error(post(client, files), 422, "invalid_frame", "frames[3]")
    assert "JPEG, PNG or WebP" in error["message"]


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_png_and_webp_are_accepted(client, fmt):
    files = [("frames", (f"{i}.{fmt.lower()}", frame_bytes(fmt), "image/x")) for i in range(3)]
    assert post(client, files).status_code == 200


@pytest.mark.parametrize(
    ("width", "height"),
    [(5000, 5000), (100_000, 100_000)],  # above our 4096^2 limit; above PIL's own bomb limit
)
def test_pixel_bomb_is_refused_before_decoding(client, width, height):
    files = with_bad_frame(1, "bomb.png", png_header_only(width, height), "image/png")
    error = assert_error(post(client, files), 413, "image_too_large", "frames[1]")
    assert "bomb.png" in error["message"]


def test_pixel_limit_is_a_setting(tiny_gallery: TinyGallery):
    with running_client(make_settings(tiny_gallery, max_image_pixels=40 * 40)) as client:
        files = with_bad_frame(0, "big.jpg", frame_bytes("JPEG", (41, 41)))
        error = assert_error(post(client, files), 413, "image_too_large", "frames[0]")
        assert "41x41" in error["message"]
        assert post(client, good_frames(2)).status_code == 200  # 24x48 is under the limit


def multipart_body(files: list[tuple[str, tuple[str, bytes, str]]], fields: dict) -> bytes:
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                  f"{value}\r\n".encode())
    for name, (filename, data, mime) in files:
        out.write(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; '
                  f'filename="{filename}"\r\nContent-Type: {mime}\r\n\r\n'.encode())
        out.write(data + b"\r\n")
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


def test_request_above_byte_limit(tiny_gallery: TinyGallery):
    limit = 64 * 1024
    with running_client(make_settings(tiny_gallery, max_request_bytes=limit)) as client:
        big = [("frames", ("big.png", png_header_only(10, 10) + b"\0" * (limit + 10), "image/png"))]
        error = assert_error(post(client, big), 413, "request_too_large", "body")
        assert str(limit) in error["message"]

        # Chunked upload without Content-Length: counted while reading.
        body = multipart_body(big, {"modality": "infrared"})
        chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))
        response = client.post(
            "/v1/query", content=chunks,
            headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
        assert "content-length" not in response.request.headers
        assert_error(response, 413, "request_too_large", "body")
        assert post(client, good_frames(2)).status_code == 200


@pytest.mark.parametrize(
    ("fields", "part"),
    [
        ({"modality": "ultraviolet"}, "modality"),
        ({"modality": ""}, "modality"),
        ({"top_k": "0"}, "top_k"),
        ({"top_k": "ten"}, "top_k"),
        ({"top_k": "1001"}, "top_k"),
        ({"camera": "left"}, "camera"),
        ({"camera": "-1"}, "camera"),
        ({"camid": "-3"}, "camid"),
        ({"cross_modal": "maybe"}, "cross_modal"),
        ({"camera": "99999999999999999999999"}, "camera"),
        ({"camera": "\u00b2"}, "camera"),  # "²": str.isdigit() says yes, int() says no
        ({"camera": "1,2\u00b3"}, "camera"),
        ({"camid": "99999999999999999999999"}, "camid"),
        ({"camid": "\u00b2"}, "camid"),
        ({"camid": "1.5"}, "camid"),
        ({"top_k": "1e400"}, "top_k"),
        ({"frame": "x"}, "frame"),  # a mistyped field name is named, not ignored
    ],
)
def test_bad_fields_are_named(client, fields, part):
    data = {"modality": "infrared", **fields}
    response = client.post("/v1/query", files=good_frames(2), data=data)
    error = assert_error(response, 422, "invalid_field", part)
    assert part in error["message"]


def test_missing_modality_is_named(client):
    response = client.post("/v1/query", files=good_frames(2))
    assert_error(response, 422, "invalid_field", "modality")


def test_unknown_route_and_method_are_json(client):
    assert_error(client.get("/v2/nothing"), 404, "not_found", None)
    assert_error(client.get("/v1/query"), 405, "method_not_allowed", None)


def test_server_still_answers_after_bad_input(client, tiny_gallery: TinyGallery):
    post(client, with_bad_frame(0, "x.jpg", b"garbage"))
    post(client, good_frames(65))
    probe = tiny_gallery.of(Modality.INFRARED, 3)
    response = client.post("/v1/query", files=probe.files(),
                           data={"modality": "infrared", "cross_modal": "false"})
    assert response.status_code == 200
    assert response.json()["matches"][0]["tracklet_id"] == probe.tracklet_id


def test_internal_error_is_500_with_request_id_and_no_trace(tiny_gallery: TinyGallery):
    with running_client(make_settings(tiny_gallery)) as client:
        engine = client.app.state.engine

        def failing_search(*args, **kwargs):
            raise RuntimeError("secret internal detail")

        engine.index.search = failing_search  # an index failure the server cannot foresee
        response = post(client, good_frames(2))
        error = assert_error(response, 500, "internal_error", None)
        assert "secret" not in response.text and "Traceback" not in response.text
        assert response.json()["request_id"] in error["message"]


@pytest.mark.parametrize("field", ["modality", "top_k", "camid", "cross_modal"])
def test_repeated_single_valued_field_is_rejected(client, field):
    value = {"modality": "infrared", "top_k": "3", "camid": "0", "cross_modal": "true"}[field]
    body = {"modality": "infrared", field: [value, value]}
    response = client.post("/v1/query", files=good_frames(2), data=body)
    error = assert_error(response, 422, "invalid_field", field)
    assert "2 times" in error["message"]


def test_unknown_file_field_is_named(client):
    files = [("frame", ("0.jpg", frame_bytes(), "image/jpeg"))]
    error = assert_error(post(client, files), 422, "invalid_field", "frame")
    assert "'frame'" in error["message"] and "frames" in error["message"]


@pytest.fixture(scope="module")
def writer(tiny_gallery: TinyGallery, tmp_path_factory):
    """A server over a private index copy that accepts writes with key 'k'."""
    import shutil

    root = tmp_path_factory.mktemp("writer")
    shutil.copytree(tiny_gallery.index, root / "index")
    settings = make_settings(tiny_gallery, index=root / "index", api_key="k")
    with running_client(settings) as client:
        client.headers["X-API-Key"] = "k"
        yield client


@pytest.mark.parametrize(
    ("fields", "part"),
    [
        ({"tracklet_id": "ok-id\n"}, "tracklet_id"),  # a pattern ending in $ let this through
        ({"tracklet_id": "-starts-with-dash"}, "tracklet_id"),
        ({"timestamp": "nan"}, "timestamp"),
        ({"timestamp": "inf"}, "timestamp"),
        ({"timestamp": "-Infinity"}, "timestamp"),
        ({"camid": "99999999999999999999999"}, "camid"),
        ({"pid": "99999999999999999999"}, "pid"),
        ({"pid": "\u00b2"}, "pid"),
        ({"modality": "rgb", "extra": "1"}, "extra"),
    ],
)
def test_gallery_fields_are_validated(writer, fields, part):
    data = {"modality": "visible", "camid": "0", **fields}
    response = writer.post("/v1/gallery", files=good_frames(2), data=data)
    error = assert_error(response, 422, "invalid_field", part)
    assert part in error["message"]
    assert writer.get("/v1/index").json()["index"]["size"] == 8  # nothing was added
