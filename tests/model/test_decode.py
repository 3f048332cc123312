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
