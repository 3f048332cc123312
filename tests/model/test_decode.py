"""JPEG frames decode through libjpeg-turbo (simplejpeg) with PIL's pixels; others through PIL."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from vvireid.model import preprocess
from vvireid.model.preprocess import FrameError, decode_jpeg_rgb, load_image


def _photo(height: int = 288, width: int = 144, mode: str = "RGB") -> Image.Image:
    """Smooth gradients plus noise: chroma edges and texture, like a person crop."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _jpeg(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", **options)
    return out.getvalue()


def _pil(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize(("mode", "options"), [
    ("RGB", {"quality": 90}),  # 4:2:0, the common camera output
    ("RGB", {"quality": 95, "subsampling": 0}),  # 4:4:4
    ("RGB", {"quality": 75, "subsampling": 1, "progressive": True}),  # 4:2:2, progressive
    ("L", {"quality": 90}),  # grayscale (infrared frames are often stored this way)
])
def test_jpeg_pixels_equal_pils(mode, options, tmp_path):
    data = _jpeg(_photo(mode=mode), **options)
    fast = decode_jpeg_rgb(data)
    assert fast is not None and fast.mode == "RGB"
    expected = _pil(data)
    diff = np.abs(np.asarray(fast).astype(int) - expected.astype(int))
    assert diff.max() == 0  # same libjpeg-turbo, same settings: PIL's pixels exactly
    path = tmp_path / "frame.jpg"
    path.write_bytes(data)
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(fast))
    np.testing.assert_array_equal(np.asarray(load_image(data)), np.asarray(fast))


def test_other_formats_and_declined_jpegs_go_through_pil(tmp_path, monkeypatch):
    png = io.BytesIO()
    _photo().save(png, format="PNG")
    assert decode_jpeg_rgb(png.getvalue()) is None
    np.testing.assert_array_equal(np.asarray(load_image(png.getvalue())), np.asarray(_photo()))
    cmyk = _jpeg(_photo().convert("CMYK"))
    assert decode_jpeg_rgb(cmyk) is None
    np.testing.assert_array_equal(np.asarray(load_image(cmyk)), _pil(cmyk))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL keeps its bomb check
    assert decode_jpeg_rgb(_jpeg(_photo())) is None


def test_broken_jpeg_is_named(tmp_path):
    path = tmp_path / "cam1" / "0007.jpg"
    path.parent.mkdir()
    path.write_bytes(_jpeg(_photo())[:200])
    with pytest.raises(FrameError, match=r"0007\.jpg: not a readable image"):
        load_image(path)
    with pytest.raises(FrameError, match=r"missing\.jpg: cannot open"):
        load_image(tmp_path / "missing.jpg")


def test_without_simplejpeg_pil_decodes(monkeypatch):
    data = _jpeg(_photo())
    monkeypatch.setattr(preprocess, "simplejpeg", None)
    assert decode_jpeg_rgb(data) is None
    np.testing.assert_array_equal(np.asarray(load_image(data)), _pil(data))


def test_frame_tensor_values_equal_the_torch_formula():
    import torch
    from vvireid.model.config import ModelConfig
    from vvireid.model.preprocess import FramePreprocessor

    preprocessor = FramePreprocessor(ModelConfig("vld", 5, image_size=(64, 32)).preprocess)
    image = _photo(300, 150)
    got = preprocessor.frame_tensor(image)
    resized = np.asarray(image.resize((32, 64), Image.BILINEAR)).copy()
    pixels = torch.from_numpy(resized).permute(2, 0, 1).float()
    mean = torch.tensor(preprocessor.config.mean).view(3, 1, 1)
    std = torch.tensor(preprocessor.config.std).view(3, 1, 1)
    assert got.is_contiguous() and got.dtype == torch.float32
    assert torch.equal(got, pixels.div(255.0).sub(mean).div(std))  # bit for bit


# ---- uint8 pixels normalised where the model runs, and the batched device decoder ---------------

def _preprocessor(size=(64, 32)):
    from vvireid.model.config import ModelConfig
    from vvireid.model.preprocess import FramePreprocessor

    return FramePreprocessor(ModelConfig("vld", 5, image_size=size, seq_len=4).preprocess)


def test_pixel_clips_normalised_equal_the_float_clips(tmp_path):
    import torch
    from vvireid.model.preprocess import normalize_pixels

    preprocessor = _preprocessor()
    path = tmp_path / "f.jpg"
    path.write_bytes(_jpeg(_photo(300, 150), quality=90))
    png = io.BytesIO()
    _photo(40, 20).save(png, format="PNG")
    frames = [
        path,  # a file
        _jpeg(_photo(64, 32), quality=90),  # already at the model's size
        png.getvalue(),  # not a JPEG: PIL
        _jpeg(_photo(50, 30).convert("CMYK")),  # CMYK: PIL's conversion
        _photo(70, 40),  # a PIL image
        np.asarray(_photo(64, 32)),  # an RGB array at the model's size
        np.asarray(_photo(20, 10, mode="L")),  # a grey array
    ]
    pixels = preprocessor.pixel_clips(frames)
    reference = preprocessor.clips(frames)
    assert pixels.dtype == torch.uint8 and pixels.shape == reference.shape
    normalised = normalize_pixels(pixels, preprocessor.config)
    assert normalised.dtype == torch.float32
    assert (normalised - reference).abs().max().item() <= 1e-6  # 0 on the CPU: same float ops
    with pytest.raises(ValueError, match="uint8"):
        normalize_pixels(reference, preprocessor.config)


def test_pixel_clips_name_the_bad_frame(tmp_path):
    bad = tmp_path / "cam2" / "0003.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8\xff not really")
    good = _jpeg(_photo(64, 32))
    with pytest.raises(FrameError, match=r"0003\.jpg: not a readable image"):
        _preprocessor().pixel_clips([good, str(bad), good, good])
    with pytest.raises(FrameError, match=r"frames\[1\]: cannot open"):
        _preprocessor().pixel_clips([good, str(tmp_path / "gone.jpg")], names=["a", "frames[1]"])


def test_device_decodable_accepts_only_plain_complete_jpegs():
    from vvireid.model.preprocess import device_decodable

    jpeg = _jpeg(_photo(), quality=90)
    png = io.BytesIO()
    _photo().save(png, format="PNG")
    assert device_decodable(jpeg) and device_decodable(_jpeg(_photo(mode="L")))
    assert not device_decodable(png.getvalue())
    assert not device_decodable(_jpeg(_photo().convert("CMYK")))
    assert not device_decodable(jpeg[: len(jpeg) // 2])  # truncated: PIL must name it


@pytest.mark.parametrize(("source", "target"), [
    ((288, 144), (288, 144)),  # already the model's size: the same pixels
    ((400, 200), (288, 144)),  # downscale
    ((531, 217), (288, 144)),  # another aspect ratio
    ((40, 20), (64, 32)),  # upscale
])
@pytest.mark.parametrize("options", [{"quality": 90}, {"quality": 75, "progressive": True}])
def test_device_decode_and_resize_match_pil_within_a_grey_level(source, target, options):
    import torch
    from vvireid.model.preprocess import decode_jpegs, load_pixels, resize_pixels

    preprocessor = _preprocessor(target)
    data = [_jpeg(_photo(*source), **options), _jpeg(_photo(*source, mode="L"), **options)]
    decoded = decode_jpegs(data, torch.device("cpu"))
    assert all(d is not None and d.dtype == torch.uint8 and d.shape[0] == 3 for d in decoded)
    got = resize_pixels(decoded, target).numpy().astype(int)
    expected = np.stack(
        [preprocessor.frame_pixels(load_pixels(d)).transpose(2, 0, 1) for d in data]
    ).astype(int)
    diff = np.abs(got - expected)
    # Measured on the CPU: mean 0.08-0.22, max 1 (float interpolation vs PIL's fixed point).
    assert diff.mean() < 0.5 and diff.max() <= 1
    if source == target:
        assert diff.max() == 0


def test_decode_jpegs_leaves_a_declined_frame_to_the_cpu():
    import torch
    from vvireid.model.preprocess import decode_jpegs

    good = _jpeg(_photo(32, 16))
    broken = b"\xff\xd8\xff" + b"\x00" * 64 + b"\xff\xd9"  # passes the cheap checks only
    decoded = decode_jpegs([good, broken, good], torch.device("cpu"))
    assert decoded[1] is None
    assert decoded[0] is not None and torch.equal(decoded[0], decoded[2])
    assert decode_jpegs([], torch.device("cpu")) == []
