"""Train-time augmentation of tracklets, per method, as the official code does it.

A transform maps the decoded PIL frames of one sampled clip to a normalised tensor::

    transform(frames: list[PIL.Image], modality, rng) -> Tensor [T, 3, H, W]

and ``transform.pair(rgb_frames, ir_frames, rng)`` handles one (visible, infrared) training item,
applying a tracklet-level flip shared by both when configured (BUPTCampus aligned pairs). Every
random decision is drawn from the given ``numpy.random.Generator``, so a seeded generator gives
the same tensors (official chains: docs/fidelity.md V19, X20, X21).

* ``vld``: per frame resize, zero pad 10, random crop back, flip p=0.5, normalise (ImageNet),
  random erasing (p=0.5, area 0.02-0.4, aspect 0.3-3.33, constant fill (0.4914, 0.4822, 0.4465)
  written in normalised space); visible tracklets get ChannelExchange on a per-tracklet fair coin
  (each frame: one random channel copied to all three); infrared frames get ChannelAdapGray
  (p=0.5: 3/4 copy a random channel, else luma with p=0.5, else unchanged), after normalisation as
  in the official code.
* ``xreid``: resize, one flip decision per clip (p=0.5), per-frame random erasing (p=0.5, area
  0.02-0.2, aspect 0.3-3.33, one random RGB colour) then normalise. The official eraser pastes
  the rectangle at (w, h) instead of at the sampled corner; we paste at the sampled corner.
* ``none``: resize and normalise only (smoke tests, ablations).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from vvireid.model.preprocess import IMAGENET_MEAN, IMAGENET_STD
from vvireid.model.types import Modality

VLD_ERASE_FILL = (0.4914, 0.4822, 0.4465)
LUMA = np.array([0.2989, 0.587, 0.114], dtype=np.float32)


def erase_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    area: tuple[float, float],
    min_aspect: float = 0.3,
    attempts: int = 100,
) -> tuple[int, int, int, int] | None:
    """Random-erasing rectangle (top, left, h, w) or None when no attempt fits (Zhong et al.)."""
    for _ in range(attempts):
        target = rng.uniform(*area) * height * width
        aspect = rng.uniform(min_aspect, 1 / min_aspect)
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if 0 < h < height and 0 < w < width:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


@dataclass
class _Base:
    """Resize and normalisation shared by every method."""

    image_size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pair_flip_p: float = 0.0

    def _resize(self, image: Image.Image) -> np.ndarray:
        height, width = self.image_size
        return np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR))

    def _normalise(self, array: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return ((array.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)

    def __call__(
        self, frames: Sequence[Image.Image], modality: Modality, rng: np.random.Generator
    ) -> torch.Tensor:
        clip = self._clip(list(frames), Modality.parse(modality), rng)
        return torch.from_numpy(np.ascontiguousarray(np.stack(clip)))

    def _clip(
        self, frames: list[Image.Image], modality: Modality, rng: np.random.Generator
    ) -> list[np.ndarray]:
        return [self._normalise(self._resize(f)) for f in frames]

    def pair(
        self,
        rgb_frames: Sequence[Image.Image],
        ir_frames: Sequence[Image.Image],
        rng: np.random.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one (visible, infrared) item; a shared tracklet-level flip when configured."""
        rgb_frames, ir_frames = list(rgb_frames), list(ir_frames)
        if self.pair_flip_p > 0 and rng.random() < self.pair_flip_p:
            rgb_frames = [f.transpose(Image.FLIP_LEFT_RIGHT) for f in rgb_frames]
            ir_frames = [f.transpose(Image.FLIP_LEFT_RIGHT) for f in ir_frames]
        return self(rgb_frames, Modality.VISIBLE, rng), self(ir_frames, Modality.INFRARED, rng)


@dataclass
class PlainTransform(_Base):
    """Resize and normalise, no randomness (apart from an optional pair flip)."""


@dataclass
class VLDTransform(_Base):
    """VLD / CAJ augmentation, independent per frame (module docstring)."""

    pad: int = 10
    flip_p: float = 0.5
    erase_p: float = 0.5
    erase_area: tuple[float, float] = (0.02, 0.4)
    erase_fill: tuple[float, float, float] = VLD_ERASE_FILL
    channel_exchange_p: float = 0.5
    adaptive_gray_p: float = 0.5

    def _clip(
        self, frames: list[Image.Image], modality: Modality, rng: np.random.Generator
    ) -> list[np.ndarray]:
        exchange = modality == Modality.VISIBLE and rng.random() < self.channel_exchange_p
        out = []
        for frame in frames:
            array = self._normalise(self._crop_flip(self._resize(frame), rng))
            self._erase(array, rng)
            if exchange:
                array[:] = array[int(rng.integers(3))]
            elif modality == Modality.INFRARED:
                self._adaptive_gray(array, rng)
            out.append(array)
        return out

    def _crop_flip(self, array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height, width = array.shape[:2]
        padded = np.zeros((height + 2 * self.pad, width + 2 * self.pad, 3), dtype=array.dtype)
        padded[self.pad : self.pad + height, self.pad : self.pad + width] = array
        top, left = (int(v) for v in rng.integers(0, 2 * self.pad + 1, 2))
        array = padded[top : top + height, left : left + width]
        return array[:, ::-1] if rng.random() < self.flip_p else array

    def _erase(self, array: np.ndarray, rng: np.random.Generator) -> None:
        if rng.random() >= self.erase_p:
            return
        box = erase_box(rng, array.shape[1], array.shape[2], self.erase_area)
        if box is not None:
            top, left, h, w = box
            array[:, top : top + h, left : left + w] = np.asarray(
                self.erase_fill, dtype=np.float32
            )[:, None, None]

    def _adaptive_gray(self, array: np.ndarray, rng: np.random.Generator) -> None:
        choice = int(rng.integers(4))
        if choice < 3:
            array[:] = array[choice]
        elif rng.random() < self.adaptive_gray_p:
            array[:] = np.tensordot(LUMA, array, axes=1)


@dataclass
class XReIDTransform(_Base):
    """X-ReID augmentation: clip-level flip, per-frame random-colour erasing (module docstring)."""

    flip_p: float = 0.5
    erase_p: float = 0.5
    erase_area: tuple[float, float] = (0.02, 0.2)

    def _clip(
        self, frames: list[Image.Image], modality: Modality, rng: np.random.Generator
    ) -> list[np.ndarray]:
        flip = rng.random() < self.flip_p
        out = []
        for frame in frames:
            array = self._resize(frame)
            array = array[:, ::-1].copy() if flip else array.copy()
            if rng.random() < self.erase_p:
                box = erase_box(rng, array.shape[0], array.shape[1], self.erase_area)
                if box is not None:
                    top, left, h, w = box
                    array[top : top + h, left : left + w] = rng.integers(0, 256, 3, dtype=np.uint8)
            out.append(self._normalise(array))
        return out


TRANSFORMS = {"vld": VLDTransform, "xreid": XReIDTransform, "none": PlainTransform}


def build_train_transform(
    method: str,
    image_size: tuple[int, int],
    *,
    pair_flip: bool = False,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> _Base:
    """The training augmentation of ``method`` (``vld``, ``xreid`` or ``none``).

    Args:
        method: which official pipeline to reproduce.
        image_size: (H, W) of the output frames.
        pair_flip: add the BUPTCampus tracklet-level flip (p=0.5) shared by an aligned RGB/IR pair.
        mean, std: normalisation (both official codes use ImageNet statistics).

    Raises:
        ValueError: for an unknown method, listing the known ones.
    """
    if method not in TRANSFORMS:
        raise ValueError(f"unknown augmentation {method!r}; known: {', '.join(TRANSFORMS)}")
    size = (int(image_size[0]), int(image_size[1]))
    return TRANSFORMS[method](
        image_size=size, mean=tuple(mean), std=tuple(std), pair_flip_p=0.5 if pair_flip else 0.0
    )
