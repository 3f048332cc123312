"""Frame preprocessing shared by training evaluation, the indexer and the server.

One code path turns decoded frames into the normalised tensor the model expects, so that a gallery
tracklet indexed offline and the same frames posted to the server give identical features.
Resize is PIL bilinear straight to (H, W) (re-ID style: no aspect-preserving crop, which would cut
pedestrians), then ImageNet mean/std as both official codebases use.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from vvireid.model.sampling import sample_test

try:  # libjpeg-turbo without PIL's per-image overhead; PIL decodes everything if it is missing
    import simplejpeg
except ImportError:  # pragma: no cover - a core dependency, absent only in trimmed installs
    simplejpeg = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FrameSource = Union[str, Path, bytes, Image.Image, np.ndarray]
JPEG_MAGIC = b"\xff\xd8\xff"


class FrameError(ValueError):
    """A frame could not be read or decoded; ``where`` names the file or request part."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


@dataclass(frozen=True)
class PreprocessConfig:
    """What a checkpoint records about its input: size, normalisation and test-time sampling.

    No defaults: it is derived from a :class:`~vvireid.model.config.ModelConfig` (``.preprocess``),
    which owns them, so a model and its input pipeline cannot disagree.
    """

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    seq_len: int
    test_sampling: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        return cls(
            image_size=tuple(data["image_size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            seq_len=int(data["seq_len"]),
            test_sampling=str(data["test_sampling"]),
        )


def load_image(source: FrameSource, where: str | None = None) -> Image.Image:
    """Decode one frame to an RGB PIL image.

    Raises:
        FrameError: naming the file (or ``where``) and why it cannot be used.
    """
    label = where or (str(source) if isinstance(source, (str, Path)) else "frame")
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        if source.ndim == 2 or (source.ndim == 3 and source.shape[2] in (1, 3)):
            return Image.fromarray(np.ascontiguousarray(source).squeeze()).convert("RGB")
        raise FrameError(label, f"array of shape {source.shape} is not an HxW or HxWx3 image")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as exc:
        raise FrameError(label, f"cannot open: {exc.strerror or exc}") from None
    fast = decode_jpeg_rgb(data)
    if fast is not None:
        return fast
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise FrameError(label, f"not a readable image ({exc})") from None


def decode_jpeg_rgb(data: bytes) -> Image.Image | None:
    """A JPEG decoded by libjpeg-turbo (simplejpeg) straight to RGB, or None to use PIL.

    Same library and settings as PIL's decoder (accurate integer DCT, smooth chroma
    upsampling), so the pixels are PIL's (``tests/model/test_decode.py``), at about half the
    cost for video-sized frames. None for non-JPEG data, when simplejpeg is missing, for
    images over PIL's decompression-bomb limit (PIL then warns or refuses as it always did),
    for CMYK/YCCK (PIL's own conversion is kept) and for anything simplejpeg declines: PIL then decodes the frame or
    names the problem.
    """
    if simplejpeg is None or not data.startswith(JPEG_MAGIC):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        limit = Image.MAX_IMAGE_PIXELS
        if colorspace not in ("YCbCr", "Gray", "RGB") or (
            limit is not None and height * width > limit
        ):
            return None  # CMYK/YCCK: PIL's conversion to RGB rounds differently
        return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB"))
    except (ValueError, RuntimeError, OSError):
        return None


class FramePreprocessor:
    """Turns frames into normalised tensors and tracklets into test-time clips.

    Shape: ``frame_tensor`` -> [3, H, W]; ``clips`` -> [C, T, 3, H, W] (C = 1 except ``dense``).
    """

    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config
        self._mean = torch.tensor(config.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(config.std, dtype=torch.float32).view(3, 1, 1)
        self._mean_np = self._mean.numpy()
        self._std_np = self._std.numpy()

    def frame_tensor(self, image: Image.Image) -> torch.Tensor:
        """Resize (bilinear) to (H, W), scale to [0, 1], normalise. Returns float32 [3, H, W].

        The arithmetic is numpy's float32 (the same correctly rounded divide and subtract as
        torch's, so the same values): torch would hand each op to its intra-op thread pool, and
        many decode threads doing that at once oversubscribe every core.
        """
        height, width = self.config.image_size
        resized = image.convert("RGB").resize((width, height), Image.BILINEAR)
        pixels = np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32, order="C")
        pixels /= np.float32(255.0)
        pixels -= self._mean_np
        pixels /= self._std_np
        return torch.from_numpy(pixels)

    def clip_indices(self, num_frames: int) -> list[list[int]]:
        """The frame indices of each test clip under this checkpoint's sampling rule."""
        return sample_test(num_frames, self.config.seq_len, self.config.test_sampling)

    def clips(self, frames: Sequence[FrameSource], names: Sequence[str] | None = None) -> torch.Tensor:
        """Sample, decode and normalise a tracklet's frames; only sampled frames are decoded.

        Raises:
            FrameError: for the first frame that cannot be decoded (named by ``names`` if given).
        """
        if len(frames) == 0:
            raise FrameError("tracklet", "has no frames")
        indices = self.clip_indices(len(frames))
        wanted = sorted({i for clip in indices for i in clip})
        decoded = {}
        for i in wanted:
            where = names[i] if names is not None else None
            decoded[i] = self.frame_tensor(load_image(frames[i], where))
        return torch.stack([torch.stack([decoded[i] for i in clip]) for clip in indices])
