"""Indexing's data path: uint8 pixels normalised on the encode device, and batched device decode.

``decode="cpu"`` must give the vectors of the float path bit for bit (the same numbers, only the
place of the arithmetic moved); ``decode="device"`` resizes in float on the device, so it is held
to cosine 0.999 of the CPU path. Both must name every bad frame exactly as before. The device path
runs here on the CPU (libjpeg through torchvision), the same code nvJPEG runs under on CUDA.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from vvireid.indexer import cli
from vvireid.indexer import encode as encode_module
from vvireid.indexer.encode import THUMBNAIL_MAX_HEIGHT, TrackletEncoder, resolve_decode
from vvireid.indexer.store import GalleryIndex
from vvireid.model.checkpoint import load_checkpoint
from vvireid.model.types import Modality, Tracklet

CPU = torch.device("cpu")


def _encoder(checkpoint_path: Path, decode: str) -> TrackletEncoder:
    return TrackletEncoder(load_checkpoint(checkpoint_path), device="cpu", batch_size=3,
                           num_workers=2, decode=decode)


def _encode(encoder: TrackletEncoder, tracklets: list[Tracklet], **options) -> dict:
    """tracklet_id -> (vector, thumbnail) and tracklet_id -> failure of one encode_tracklets run."""
    done, failures = {}, {}
    for chunk in encoder.encode_tracklets(tracklets, chunk_size=2, **options):
        for t, v, thumb in zip(chunk.tracklets, chunk.vectors, chunk.thumbnails, strict=True):
            done[t.tracklet_id] = (v, thumb)
        failures.update({f.tracklet_id: f for f in chunk.failures})
    return {"done": done, "failures": failures}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _jpeg_bytes(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", **options)
    return out.getvalue()


@pytest.fixture
def gallery(frames_of) -> list[Tracklet]:
    """Five tracklets of 40x20 JPEG files (the model is 64x32: every frame is resized)."""
    return [
        Tracklet(f"t{i}", tuple(frames_of(f"t{i}", 3 + 2 * i, i)),
                 Modality.VISIBLE if i % 2 else Modality.INFRARED, i % 3)
        for i in range(5)
    ]


def test_uint8_path_gives_the_float_paths_vectors(checkpoint, gallery):
    encoder = _encoder(checkpoint(), "cpu")
    got = _encode(encoder, gallery)
    floats = [encoder.prepare(t.frames) for t in gallery]
    expected = encoder.encode_prepared(floats, [t.camid for t in gallery])
    vectors = np.stack([got["done"][t.tracklet_id][0] for t in gallery])
    assert np.abs(vectors - expected).max() <= 1e-5
    loaded = encoder._load(gallery[0], thumbnails=False)
    assert loaded.clips.dtype == torch.uint8  # what the workers hand over: pixels, not floats
    pixels = [encoder.prepare_pixels(t.frames) for t in gallery]
    assert all(torch.equal(encoder.prepare_pixels_with_thumbnail(t.frames)[0], p)
               for t, p in zip(gallery, pixels, strict=True))
    mixed = encoder.encode_prepared([floats[0], pixels[1], floats[2]], [0, 1, None])
    alone = encoder.encode_prepared([floats[0], floats[1], floats[2]], [0, 1, None])
    assert np.abs(mixed - alone).max() <= 1e-5  # a uint8 set among float ones is normalised


def test_device_decode_stays_within_cosine_0_999_of_the_cpu_path(checkpoint, gallery):
    ckpt = checkpoint()
    cpu = _encode(_encoder(ckpt, "cpu"), gallery)
    device = _encode(_encoder(ckpt, "device"), gallery)
    assert not cpu["failures"] and not device["failures"]
    assert list(device["done"]) == [t.tracklet_id for t in gallery]  # order kept
    for tracklet_id, (vector, thumbnail) in device["done"].items():
        assert _cosine(vector, cpu["done"][tracklet_id][0]) >= 0.999
        image = Image.open(io.BytesIO(thumbnail))
        assert image.format == "JPEG" and image.size == (20, 40)  # 40 high: kept as it is
    without = _encode(_encoder(ckpt, "device"), gallery, thumbnails=False)
    assert all(thumb is None for _, thumb in without["done"].values())


def test_device_thumbnails_are_resized_to_the_thumbnail_height(checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for n in range(3):
        pixels = rng.integers(0, 256, size=(300, 150, 3), dtype=np.uint8)
        path = tmp_path / f"{n}.jpg"
        path.write_bytes(_jpeg_bytes(Image.fromarray(pixels), quality=90))
        paths.append(str(path))
    tracklet = Tracklet("tall", tuple(paths), Modality.VISIBLE, 0)
    ckpt = checkpoint()
    device = _encode(_encoder(ckpt, "device"), [tracklet])["done"]["tall"]
    cpu = _encode(_encoder(ckpt, "cpu"), [tracklet])["done"]["tall"]
    thumbs = [np.asarray(Image.open(io.BytesIO(r[1])), dtype=float) for r in (device, cpu)]
    assert thumbs[0].shape == thumbs[1].shape == (THUMBNAIL_MAX_HEIGHT, 64, 3)
    assert np.abs(thumbs[0] - thumbs[1]).mean() < 3  # the same picture (two JPEG encodes)
    assert _cosine(device[0], cpu[0]) >= 0.999


def test_other_frames_take_the_cpu_path_and_bad_ones_are_named(checkpoint, frames_of, tmp_path):
    base = frames_of("mixed", 4, 7)
    png, cmyk = tmp_path / "mixed" / "1.png", tmp_path / "mixed" / "2.jpg"
    Image.open(base[1]).save(png)
    cmyk.write_bytes(_jpeg_bytes(Image.open(base[2]).convert("CMYK")))
    mixed = Tracklet("mixed", (base[0], str(png), str(cmyk), base[3]), Modality.VISIBLE, 0)
    in_memory = Tracklet("bytes", tuple(Path(f).read_bytes() for f in base), Modality.INFRARED, 1)
    truncated = tmp_path / "cut" / "0.jpg"
    truncated.parent.mkdir()
    truncated.write_bytes(Path(base[0]).read_bytes()[:300])  # header intact, no end marker
    undecodable = tmp_path / "bad" / "0.jpg"  # passes the cheap checks, fails the decoder
    undecodable.parent.mkdir()
    undecodable.write_bytes(b"\xff\xd8\xff" + b"\x00" * 64 + b"\xff\xd9")
    corrupt = tmp_path / "corrupt" / "0.jpg"  # a sound header, a bad marker in the scan:
    corrupt.parent.mkdir()  # the device decoder refuses it, then PIL names it
    data = Path(base[0]).read_bytes()
    scan = data.index(b"\xff\xda") + 20
    corrupt.write_bytes(data[:scan] + b"\xff\x67" + data[scan + 2 :])
    bad = [
        Tracklet("cut", (base[0], str(truncated)), Modality.VISIBLE, 0),
        Tracklet("bad", (str(undecodable), base[1]), Modality.VISIBLE, 0),
        Tracklet("corrupt", (base[1], str(corrupt), base[2]), Modality.VISIBLE, 0),
        Tracklet("missing", (str(tmp_path / "nowhere.jpg"),), Modality.VISIBLE, 0),
    ]
    ckpt = checkpoint()
    results = {d: _encode(_encoder(ckpt, d), [mixed, *bad, in_memory]) for d in ("cpu", "device")}
    for decode, result in results.items():
        assert list(result["done"]) == ["mixed", "bytes"], decode
        failures = result["failures"]
        assert failures["cut"].path == str(truncated), decode
        assert failures["bad"].path == str(undecodable), decode
        assert failures["corrupt"].path == str(corrupt), decode
        assert "not a readable image" in failures["corrupt"].reason
        assert failures["missing"].path.endswith("nowhere.jpg"), decode
        assert "not a readable image" in failures["cut"].reason
        assert "not a readable image" in failures["bad"].reason
        assert "cannot open" in failures["missing"].reason
    for tracklet_id in ("mixed", "bytes"):
        cosine = _cosine(results["device"]["done"][tracklet_id][0],
                         results["cpu"]["done"][tracklet_id][0])
        assert cosine >= 0.999


def test_a_frame_the_device_declines_is_decoded_on_the_cpu(checkpoint, gallery, monkeypatch,
                                                          caplog):
    """nvJPEG refuses some JPEGs libjpeg reads (e.g. arithmetic coding): those frames must be
    decoded by the CPU path, which gives exactly the CPU path's pixels."""
    real = encode_module.decode_jpegs
    monkeypatch.setattr(encode_module, "decode_jpegs",
                        lambda datas, device: [None, *real(datas[1:], device)])
    ckpt = checkpoint()
    device = _encode(_encoder(ckpt, "device"), gallery)
    cpu = _encode(_encoder(ckpt, "cpu"), gallery)
    assert not device["failures"] and list(device["done"]) == list(cpu["done"])
    for tracklet_id, (vector, _) in device["done"].items():
        assert _cosine(vector, cpu["done"][tracklet_id][0]) >= 0.999
    assert "1 of 6 JPEG frames could not be decoded on cpu; decoded on the CPU" in caplog.text


def test_a_device_that_decodes_nothing_hands_decoding_to_the_cpu_threads(
    checkpoint, gallery, monkeypatch, caplog
):
    """Without a working device decoder every frame would be decoded serially by the staging
    thread; after one such chunk the encoder decodes on the CPU threads, and no tracklet (in
    flight when it switches, or later) is lost or changed."""
    monkeypatch.setattr(encode_module, "decode_jpegs", lambda datas, device: [None] * len(datas))
    ckpt = checkpoint()
    encoder = _encoder(ckpt, "device")
    device = _encode(encoder, gallery)
    cpu = _encode(_encoder(ckpt, "cpu"), gallery)
    assert encoder.decode == "cpu"
    assert not device["failures"] and list(device["done"]) == list(cpu["done"])
    for tracklet_id, (vector, thumbnail) in device["done"].items():
        assert np.allclose(vector, cpu["done"][tracklet_id][0], atol=1e-6)
        assert thumbnail == cpu["done"][tracklet_id][1]
    assert caplog.text.count("the device declined every JPEG frame of a chunk") == 1


def test_decode_modes_are_checked(monkeypatch):
    assert resolve_decode("auto", CPU) == "cpu"  # auto decodes on the device only on CUDA
    assert resolve_decode("device", CPU) == "device"
    with pytest.raises(ValueError, match="unknown decode mode 'gpu'; known: auto, cpu, device"):
        resolve_decode("gpu", CPU)
    monkeypatch.setattr(encode_module, "device_decoding_available", lambda: False)
    with pytest.raises(ValueError, match="needs torchvision's decode_jpeg"):
        resolve_decode("device", CPU)
    assert resolve_decode("auto", torch.device("cuda")) == "cpu"  # nothing to decode with


def test_index_cli_decodes_where_asked(tmp_path, capsys, make_gallery, checkpoint):
    manifest, ckpt = make_gallery(6), checkpoint()
    vectors = {}
    for decode in ("cpu", "device"):
        out = tmp_path / f"index-{decode}"
        code = cli.main(["build", "--checkpoint", str(ckpt), "--gallery", str(manifest),
                         "--out", str(out), "--no-progress", "--batch-size", "4",
                         "--workers", "2", "--decode", decode])
        summary = json.loads(capsys.readouterr().out)
        assert code == 0 and summary["count"] == 6 and summary["failure_count"] == 0
        index = GalleryIndex.open(out)
        vectors[decode] = index.vectors([f"t{i}" for i in range(6)])
        assert index.thumbnail("t0") is not None
    for a, b in zip(vectors["cpu"], vectors["device"], strict=True):
        assert _cosine(a, b) >= 0.999
    code = cli.main(["build", "--checkpoint", str(ckpt), "--gallery", str(manifest),
                     "--out", str(tmp_path / "x"), "--decode", "gpu"])
    assert code == 2
    assert "invalid choice: 'gpu'" in capsys.readouterr().err


def test_dense_sampling_lays_out_every_clip_on_the_device_path(frames_of, tiny_kwargs):
    from vvireid.model.config import ModelConfig
    from vvireid.model.factory import create_model

    model = create_model(ModelConfig("xreid", 5, seq_len=4, num_cameras=3, test_sampling="dense",
                                     **tiny_kwargs)).eval()
    long = Tracklet("long", tuple(frames_of("long", 10, 3)), Modality.VISIBLE, 1)  # 3 clips
    short = Tracklet("short", tuple(frames_of("short", 3, 4)), Modality.INFRARED, 2)  # 1 clip
    results = {}
    for decode in ("cpu", "device"):
        encoder = TrackletEncoder(model, device="cpu", batch_size=2, num_workers=2, decode=decode)
        results[decode] = _encode(encoder, [long, short])["done"]
    expected = encoder.encode_prepared([encoder.prepare(long.frames)], [1])[0]
    assert np.abs(results["cpu"]["long"][0] - expected).max() <= 1e-5
    for tracklet_id in ("long", "short"):
        assert _cosine(results["device"][tracklet_id][0], results["cpu"][tracklet_id][0]) >= 0.999
