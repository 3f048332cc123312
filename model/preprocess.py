"""Frame preprocessing shared by training evaluation, the indexer and the server.

One code path turns decoded frames into the normalised tensor the model expects, so that a gallery
tracklet indexed offline and the same frames posted to the server give identical features.
Resize is PIL bilinear straight to (H, W) (re-ID style: no aspect-preserving crop, which would cut
pedestrians), then ImageNet mean/std as both official codebases use.

Two ways to the same numbers: ``clips`` normalises on the host (float32 clips, what training and
evaluation feed the model), ``pixel_clips`` stops at the resized uint8 pixels and
:func:`normalize_pixels` finishes them where the model runs, so the indexer moves 4x fewer bytes
and does no float work in its decode threads. ``decode_jpegs``/``resize_pixels`` do the decode and
resize themselves on a device (nvJPEG on CUDA), for frames :func:`device_decodable` accepts.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
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


def read_frame(source: FrameSource, where: str | None = None) -> FrameSource:
    """A path's bytes (the file read once, here); any other source as it is.

    Raises:
        FrameError: naming the file (or ``where``) when it cannot be opened.
    """
    if not isinstance(source, (str, Path)):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise FrameError(where or str(source), f"cannot open: {exc.strerror or exc}") from None


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
    data = read_frame(source, label)
    fast = decode_jpeg_rgb(data)
    if fast is not None:
        return fast
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise FrameError(label, f"not a readable image ({exc})") from None


def load_pixels(source: FrameSource, where: str | None = None) -> np.ndarray:
    """Decode one frame to RGB pixels, uint8 [H, W, 3]: ``load_image``'s pixels, fewer copies.

    A JPEG goes from libjpeg-turbo straight to the array and an RGB uint8 array is used as it
    is; only other inputs pass through a PIL image.

    Raises:
        FrameError: naming the file (or ``where``) and why it cannot be used.
    """
    if isinstance(source, np.ndarray) and source.dtype == np.uint8 and source.ndim == 3 \
            and source.shape[2] == 3:
        return np.ascontiguousarray(source)
    if isinstance(source, (str, Path, bytes)):
        where = where or (str(source) if isinstance(source, (str, Path)) else "frame")
        source = read_frame(source, where)
        fast = decode_jpeg_array(source)
        if fast is not None:
            return fast
    return np.asarray(load_image(source, where))


def plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG that decodes straight to RGB without PIL, else None.

    Plain means YCbCr, grayscale or RGB (CMYK/YCCK are left to PIL, whose conversion to RGB
    rounds differently) and within PIL's decompression-bomb limit (over it, PIL warns or refuses
    as it always did). None also when simplejpeg is missing or cannot read the header.
    """
    if simplejpeg is None or not data.startswith(JPEG_MAGIC):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, RuntimeError, OSError):
        return None
    limit = Image.MAX_IMAGE_PIXELS
    if colorspace not in ("YCbCr", "Gray", "RGB") or (limit is not None and height * width > limit):
        return None
    return height, width


def decode_jpeg_array(data: bytes) -> np.ndarray | None:
    """A JPEG decoded by libjpeg-turbo (simplejpeg) straight to RGB [H, W, 3], or None for PIL.

    Same library and settings as PIL's decoder (accurate integer DCT, smooth chroma
    upsampling), so the pixels are PIL's (``tests/model/test_decode.py``), at about half the
    cost for video-sized frames. None for what :func:`plain_jpeg_size` refuses and for
    anything simplejpeg declines: PIL then decodes the frame or names the problem.
    """
    if plain_jpeg_size(data) is None:
        return None
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except (ValueError, RuntimeError, OSError):
        return None


def decode_jpeg_rgb(data: bytes) -> Image.Image | None:
    """:func:`decode_jpeg_array` as a PIL image (no copy), or None for PIL to decode."""
    pixels = decode_jpeg_array(data)
    return None if pixels is None else Image.fromarray(pixels)


def device_decodable(data: bytes) -> bool:
    """Whether a frame may go to :func:`decode_jpegs`: a plain JPEG (see
    :func:`plain_jpeg_size`) that ends with its end-of-image marker.

    A truncated JPEG can decode without an error on some decoders (the missing rows grey); on
    the CPU path PIL refuses it and the frame is named, so such a frame stays on that path.
    """
    return plain_jpeg_size(data) is not None and data.rstrip(b"\0")[-2:] == b"\xff\xd9"


def _torchvision_decoder() -> Callable[..., Any] | None:
    """torchvision's ``decode_jpeg`` with RGB output, or None when torchvision lacks it."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except (ImportError, RuntimeError, OSError):
        return None
    # torchvision 0.29 deprecates its image codecs (for TorchCodec); they are what is installed
    # and still work, so the warning would only repeat on every chunk.
    warnings.filterwarnings(
        "ignore", message=r"The image decoding and encoding capabilities of TorchVision",
        category=DeprecationWarning,
    )

    def decode(data: torch.Tensor | list[torch.Tensor], device: torch.device) -> Any:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    return decode


def device_decoding_available() -> bool:
    """Whether :func:`decode_jpegs` can run (torchvision's JPEG decoder imports)."""
    return _torchvision_decoder() is not None


def decode_jpegs(datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEG frames in one batched call on ``device`` (nvJPEG on CUDA; libjpeg on the CPU).

    Returns one uint8 [3, h, w] RGB tensor on ``device`` per frame, or None for a frame the
    device could not decode (the caller decodes it on the CPU path, which names a bad file).
    A failed batch is retried frame by frame, so one bad frame costs only itself.
    Callers pass only frames that :func:`device_decodable` accepts.

    Raises:
        RuntimeError: torchvision's JPEG decoder is not available.
    """
    decode = _torchvision_decoder()
    if decode is None:
        raise RuntimeError("decoding on the device needs torchvision's decode_jpeg (torchvision.io)")
    if not datas:
        return []
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        return list(decode(encoded, device))
    except RuntimeError:
        pass
    frames: list[torch.Tensor | None] = []
    for data in encoded:
        try:
            frames.append(decode(data, device))
        except RuntimeError:
            frames.append(None)
    return frames


def resize_pixels(frames: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Resize uint8 [3, h, w] frames (all on one device) to ``size`` = (H, W), there.

    Bilinear with antialiasing and half-pixel centres (PIL's BILINEAR filter, in float32 and
    rounded back to uint8; PIL computes in fixed point, so a pixel can differ by a grey level
    or two). Frames already at ``size`` are copied unchanged, as PIL does. Frames are grouped
    by size so each distinct size is one interpolate call.

    Shape: n x [3, h_i, w_i] -> [n, 3, H, W] uint8.
    """
    if not frames:
        raise ValueError("resize_pixels needs at least one frame")
    out = torch.empty(len(frames), 3, *size, dtype=torch.uint8, device=frames[0].device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for n, frame in enumerate(frames):
        groups.setdefault(tuple(frame.shape), []).append(n)
    for shape, rows in groups.items():
        batch = torch.stack([frames[n] for n in rows])
        if tuple(shape[1:]) != tuple(size):
            resized = torch.nn.functional.interpolate(
                batch.float(), size=size, mode="bilinear", align_corners=False, antialias=True
            )
            batch = resized.round_().clamp_(0, 255).to(torch.uint8)
        out[torch.tensor(rows, device=out.device)] = batch
    return out


def resize_frame(frame: Image.Image | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A decoded frame (PIL image, or uint8 array [h, w, 3] or [h, w]) resized with PIL's bilinear
    filter to ``size`` = (H, W): RGB uint8 [H, W, 3].

    A frame already RGB and at ``size`` is returned as it is: PIL's resize to the same size is a
    plain copy, so skipping it changes no pixel. The one resize of the indexer, the server and
    the training augmentation, so the three see the same pixels.
    """
    height, width = size
    if isinstance(frame, np.ndarray):
        if frame.shape == (height, width, 3) and frame.dtype == np.uint8:
            return frame
        frame = Image.fromarray(np.ascontiguousarray(frame))
    if frame.mode != "RGB":
        frame = frame.convert("RGB")
    if frame.size != (width, height):
        frame = frame.resize((width, height), Image.BILINEAR)
    return np.asarray(frame)


@lru_cache(maxsize=16)
def pixel_stats(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as float32 [3, 1, 1] on ``device``, made once per device: a fresh
    host-to-GPU copy per batch would wait for the GPU."""
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=device).view(3, 1, 1)  # noqa: E731
    return as_tensor(mean), as_tensor(std)


def normalize_pixels(pixels: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """uint8 RGB pixels -> the model's input: /255, minus mean, over std, in float32.

    Runs where ``pixels`` are (the encode device), with the same three correctly rounded
    float32 operations as :meth:`FramePreprocessor.frame_tensor`, so on the CPU the result is
    that method's bit for bit (on CUDA a division may differ in the last bit).

    Shape: [..., 3, H, W] uint8 -> the same shape, float32.
    """
    if pixels.dtype != torch.uint8:
        raise ValueError(f"normalize_pixels expects uint8 pixels, got {pixels.dtype}")
    mean, std = pixel_stats(tuple(config.mean), tuple(config.std), pixels.device)
    return pixels.float().div_(255.0).sub_(mean).div_(std)


class FramePreprocessor:
    """Turns frames into normalised tensors and tracklets into test-time clips.

    Shape: ``frame_tensor`` -> [3, H, W]; ``clips`` -> [C, T, 3, H, W] (C = 1 except ``dense``)
    float32; ``pixel_clips`` -> the same shape in uint8, before :func:`normalize_pixels`.
    """

    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config
        self._mean_np = np.asarray(config.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std_np = np.asarray(config.std, dtype=np.float32).reshape(3, 1, 1)

    def frame_pixels(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """:func:`resize_frame` to this checkpoint's (H, W): uint8 [H, W, 3]."""
        return resize_frame(image, self.config.image_size)

    def frame_tensor(self, image: Image.Image) -> torch.Tensor:
        """Resize (bilinear) to (H, W), scale to [0, 1], normalise. Returns float32 [3, H, W].

        The arithmetic is numpy's float32 (the same correctly rounded divide and subtract as
        torch's, so the same values): torch would hand each op to its intra-op thread pool, and
        many decode threads doing that at once oversubscribe every core.
        """
        pixels = self.frame_pixels(image).transpose(2, 0, 1).astype(np.float32, order="C")
        pixels /= np.float32(255.0)
        pixels -= self._mean_np
        pixels /= self._std_np
        return torch.from_numpy(pixels)

    def clip_indices(self, num_frames: int) -> list[list[int]]:
        """The frame indices of each test clip under this checkpoint's sampling rule."""
        return sample_test(num_frames, self.config.seq_len, self.config.test_sampling)

    def sampled_frames(self, num_frames: int) -> tuple[list[list[int]], list[int]]:
        """(clip indices, the distinct frames they use in order): what a tracklet decodes.

        Raises:
            FrameError: for a tracklet without frames.
        """
        if num_frames == 0:
            raise FrameError("tracklet", "has no frames")
        indices = self.clip_indices(num_frames)
        return indices, sorted({i for clip in indices for i in clip})

    def clips(self, frames: Sequence[FrameSource], names: Sequence[str] | None = None) -> torch.Tensor:
        """Sample, decode and normalise a tracklet's frames; only sampled frames are decoded.

        Raises:
            FrameError: for the first frame that cannot be decoded (named by ``names`` if given).
        """
        indices, wanted = self.sampled_frames(len(frames))
        decoded = {}
        for i in wanted:
            where = names[i] if names is not None else None
            decoded[i] = self.frame_tensor(load_image(frames[i], where))
        return torch.stack([torch.stack([decoded[i] for i in clip]) for clip in indices])

    def pixel_clips(
        self, frames: Sequence[FrameSource], names: Sequence[str] | None = None
    ) -> torch.Tensor:
        """``clips`` up to the resize: uint8 [C, T, 3, H, W], to normalise on the encode device.

        ``normalize_pixels(pixel_clips(f))`` equals ``clips(f)``. The work is libjpeg-turbo,
        PIL's resize and one numpy copy per frame, all of which release the GIL, so many decode
        threads share the cores instead of queueing for the interpreter.

        Raises:
            FrameError: for the first frame that cannot be decoded (named by ``names`` if given).
        """
        indices, wanted = self.sampled_frames(len(frames))
        pixels = {
            i: self.frame_pixels(load_pixels(frames[i], names[i] if names is not None else None))
            for i in wanted
        }
        return self.assemble(indices, pixels)

    def assemble(self, indices: Sequence[Sequence[int]], pixels: dict[int, np.ndarray]) -> torch.Tensor:
        """Lay resized uint8 [H, W, 3] frames out as clips, uint8 [C, T, 3, H, W] (one copy)."""
        height, width = self.config.image_size
        out = np.empty((len(indices), len(indices[0]), 3, height, width), dtype=np.uint8)
        for c, clip in enumerate(indices):
            for t, i in enumerate(clip):
                out[c, t] = pixels[i].transpose(2, 0, 1)
        return torch.from_numpy(out)
