"""Train-time augmentation of tracklets, per method, as the official code does it.

Each transform is split in two so that the DataLoader workers only do what is cheap on uint8:

* the **CPU part** ``transform.plan(frames, modality, rng) -> (pixels, plan)`` decodes nothing
  itself (it takes decoded frames: PIL images or uint8 [h, w, 3] arrays), resizes, and does the geometry on uint8 (pad + random crop,
  flips), returning ``pixels`` uint8 [T, H, W, 3]; every other random decision (erasing boxes
  and their fill values, ChannelExchange / ChannelAdapGray choices) goes into an
  :class:`AugmentPlan` of small tensors, drawn from ``rng`` in the same order as the official
  per-frame chain;
* the **device part** :func:`apply_plan` (``transform.apply(pixels, plan)``) turns a whole batch
  [..., T, H, W, 3] into normalised float clips [..., T, 3, H, W] and applies the plan, without a
  loop over frames, on whatever device the pixels are on (the trainer calls it on the GPU right
  after the copy; a worker or a test calls it on the CPU).

``transform(frames, modality, rng)`` is both parts on the CPU: float [T, 3, H, W]. The split
changes no value: erasing with a constant written in normalised space and the channel ops act
after normalisation in the official chain, and X-ReID's uint8 erasing colour normalises to the
same float as the pixel it replaces would (``tests/training/test_augment_plan.py`` pins the result
against the pre-split implementation). ``transform.pair(rgb_frames, ir_frames, rng)`` /
``plan_pair`` handle one (visible, infrared) training item, applying a tracklet-level flip shared
by both when configured (BUPTCampus aligned pairs). Every random decision is drawn from the given
``numpy.random.Generator``, so a seeded generator gives the same tensors (docs/fidelity.md V19,
X20, X21).

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
from typing import NamedTuple, Union

import numpy as np
import torch
from PIL import Image
from vvireid.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, pixel_stats, resize_frame
from vvireid.model.types import Modality

VLD_ERASE_FILL = (0.4914, 0.4822, 0.4465)
LUMA = np.array([0.2989, 0.587, 0.114], dtype=np.float32)
LUMA_WEIGHTS = tuple(float(v) for v in LUMA)  # as python floats (the float32 values)

# AugmentPlan.channels codes: keep the frame, copy channel 0/1/2 to all three, or luma.
KEEP, COPY_R, COPY_G, COPY_B, TO_LUMA = -1, 0, 1, 2, 3


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


Frame = Union[Image.Image, np.ndarray]  # a decoded frame: PIL image or uint8 [h, w, 3]


def _flip(frame: Frame) -> Frame:
    """Left-right mirror of a decoded frame (before the resize, as the official pair flip)."""
    if isinstance(frame, np.ndarray):
        return frame[:, ::-1]
    return frame.transpose(Image.FLIP_LEFT_RIGHT)


class AugmentPlan(NamedTuple):
    """The random decisions a clip's device part applies, one row per frame.

    A NamedTuple so that the DataLoader's collate and pin_memory batch it (leading dims [B]).
    Shape: ``boxes`` int32 [..., T, 4] erasing (top, left, h, w), h = 0 for none; ``fills`` float32
    [..., T, 3] the values written in the box (normalised space); ``channels`` int8 [..., T], a
    ``KEEP``/``COPY_*``/``TO_LUMA`` code applied after erasing.
    """

    boxes: torch.Tensor
    fills: torch.Tensor
    channels: torch.Tensor

    @classmethod
    def empty(cls, frames: int) -> AugmentPlan:
        """No erasing and no channel op for ``frames`` frames."""
        return cls(torch.zeros(frames, 4, dtype=torch.int32), torch.zeros(frames, 3),
                   torch.full((frames,), KEEP, dtype=torch.int8))

    @classmethod
    def cat(cls, plans: Sequence[AugmentPlan]) -> AugmentPlan:
        """Plans of several batches joined along dim 0 (visible then infrared clips)."""
        return cls(*(torch.cat(parts) for parts in zip(*plans, strict=True)))

    def to(self, device: torch.device | str, non_blocking: bool = True) -> AugmentPlan:
        return AugmentPlan(*(t.to(device, non_blocking=non_blocking) for t in self))


def apply_plan(
    pixels: torch.Tensor,
    plan: AugmentPlan,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """The device part: normalise uint8 frames, then erase and apply the channel ops of ``plan``.

    Args:
        pixels: uint8 [..., T, H, W, 3] (what the CPU part returns, batched or not), on the device
            the work should run on.
        plan: the matching :class:`AugmentPlan` ([..., T] rows), on the same device.
        mean, std: per-channel normalisation.

    Returns:
        float32 [..., T, 3, H, W], contiguous, on ``pixels.device``.

    Raises:
        ValueError: for pixels that are not uint8 [..., H, W, 3] or a plan of another shape.
    """
    if pixels.dtype != torch.uint8 or pixels.dim() < 4 or pixels.shape[-1] != 3:
        raise ValueError(f"pixels: expected uint8 [..., T, H, W, 3], got {pixels.dtype} "
                         f"{tuple(pixels.shape)}")
    frames = tuple(pixels.shape[:-3])
    for name, tensor, tail in (("boxes", plan.boxes, (4,)), ("fills", plan.fills, (3,)),
                               ("channels", plan.channels, ())):
        if tuple(tensor.shape) != frames + tail:
            raise ValueError(f"plan.{name}: shape {tuple(tensor.shape)} does not fit pixels "
                             f"{tuple(pixels.shape)} (expected {frames + tail})")
    height, width = pixels.shape[-3:-1]
    count = math.prod(frames)
    mean_t, std_t = pixel_stats(tuple(mean), tuple(std), pixels.device)
    # One buffer: the normalised channels of every frame (rows 0 .. 3n-1), then each frame's
    # luma (rows 3n ..); the channel ops are then one row gather out of it.
    pool = torch.empty(4 * count, height, width, device=pixels.device)
    x = pool[: 3 * count].view(*frames, 3, height, width)
    x.copy_(pixels.movedim(-1, -3))  # uint8 HWC -> float CHW in one pass
    x.div_(255.0).sub_(mean_t).div_(std_t)

    # Erasing: lerp with a 0/1 weight is exact (x + 0 * d = x; the weight 1 branch is end - d * 0).
    top, left, h, w = plan.boxes.long().unbind(-1)
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    in_rows = (rows >= top[..., None]) & (rows < (top + h)[..., None])  # [..., T, H]
    in_cols = (cols >= left[..., None]) & (cols < (left + w)[..., None])  # [..., T, W]
    box = (in_rows[..., :, None] & in_cols[..., None, :]).unsqueeze(-3).to(x.dtype)
    x.lerp_(plan.fills.to(x.dtype)[..., :, None, None].expand_as(x), box)

    # ChannelExchange / ChannelAdapGray: output channel c of frame f is row 3f + c (keep), row
    # 3f + k for all three (copy channel k) or row 3n + f (luma): one row gather.
    gray = pool[3 * count :].view(*frames, height, width)
    torch.mul(x.select(-3, 0), LUMA_WEIGHTS[0], out=gray)
    gray.add_(x.select(-3, 1), alpha=LUMA_WEIGHTS[1]).add_(x.select(-3, 2), alpha=LUMA_WEIGHTS[2])
    code = plan.channels.long().reshape(count, 1)
    frame = torch.arange(count, device=x.device)[:, None]
    channel = torch.where(code == KEEP, torch.arange(3, device=x.device), code)
    rows_out = torch.where(code == TO_LUMA, 3 * count + frame, 3 * frame + channel)
    # advanced indexing, not index_select: the latter stalls for seconds with 2+ CPU threads
    return pool[rows_out.flatten()].view(*frames, 3, height, width)


@dataclass
class _Base:
    """Resize and normalisation shared by every method; the two-part protocol (module docstring)."""

    image_size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pair_flip_p: float = 0.0

    def _resize(self, image: Frame) -> np.ndarray:
        """uint8 [H, W, 3]: the indexer's and the server's resize (:func:`resize_frame`)."""
        return resize_frame(image, self.image_size)

    def _normalised(self, colour: np.ndarray) -> np.ndarray:
        """What normalisation makes of a uint8 RGB value: float32 [3] (same ops as apply_plan)."""
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return (colour.astype(np.float32) / np.float32(255.0) - mean) / std

    def _canvas(self, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Zeroed pixels [T, H, W, 3] and an empty plan (boxes, fills, channels) as numpy."""
        height, width = self.image_size
        return (np.zeros((frames, height, width, 3), dtype=np.uint8),
                np.zeros((frames, 4), dtype=np.int32), np.zeros((frames, 3), dtype=np.float32),
                np.full(frames, KEEP, dtype=np.int8))

    def plan(
        self, frames: Sequence[Frame], modality: Modality, rng: np.random.Generator
    ) -> tuple[torch.Tensor, AugmentPlan]:
        """The CPU part: uint8 pixels [T, H, W, 3] and the clip's :class:`AugmentPlan`."""
        frames = list(frames)
        pixels, boxes, fills, channels = self._canvas(len(frames))
        self._fill(frames, Modality.parse(modality), rng, pixels, boxes, fills, channels)
        return torch.from_numpy(pixels), AugmentPlan(
            torch.from_numpy(boxes), torch.from_numpy(fills), torch.from_numpy(channels))

    def _fill(self, frames: list[Frame], modality: Modality, rng: np.random.Generator,
              pixels: np.ndarray, boxes: np.ndarray, fills: np.ndarray,
              channels: np.ndarray) -> None:
        for t, frame in enumerate(frames):
            pixels[t] = self._resize(frame)

    def apply(self, pixels: torch.Tensor, plan: AugmentPlan) -> torch.Tensor:
        """The device part with this transform's normalisation (:func:`apply_plan`)."""
        return apply_plan(pixels, plan, self.mean, self.std)

    def __call__(
        self, frames: Sequence[Frame], modality: Modality, rng: np.random.Generator
    ) -> torch.Tensor:
        """Both parts on the CPU: float [T, 3, H, W]."""
        return self.apply(*self.plan(frames, modality, rng))

    def _pair_frames(
        self, rgb_frames: Sequence[Frame], ir_frames: Sequence[Frame],
        rng: np.random.Generator,
    ) -> tuple[list[Frame], list[Frame]]:
        rgb_frames, ir_frames = list(rgb_frames), list(ir_frames)
        if self.pair_flip_p > 0 and rng.random() < self.pair_flip_p:
            rgb_frames, ir_frames = [_flip(f) for f in rgb_frames], [_flip(f) for f in ir_frames]
        return rgb_frames, ir_frames

    def plan_pair(
        self,
        rgb_frames: Sequence[Frame],
        ir_frames: Sequence[Frame],
        rng: np.random.Generator,
    ) -> tuple[tuple[torch.Tensor, AugmentPlan], tuple[torch.Tensor, AugmentPlan]]:
        """CPU part of one (visible, infrared) item; a shared tracklet-level flip when configured."""
        rgb_frames, ir_frames = self._pair_frames(rgb_frames, ir_frames, rng)
        return (self.plan(rgb_frames, Modality.VISIBLE, rng),
                self.plan(ir_frames, Modality.INFRARED, rng))

    def pair(
        self,
        rgb_frames: Sequence[Frame],
        ir_frames: Sequence[Frame],
        rng: np.random.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one (visible, infrared) item on the CPU (both parts): float clips."""
        rgb, ir = self.plan_pair(rgb_frames, ir_frames, rng)
        return self.apply(*rgb), self.apply(*ir)


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

    def _fill(self, frames: list[Frame], modality: Modality, rng: np.random.Generator,
              pixels: np.ndarray, boxes: np.ndarray, fills: np.ndarray,
              channels: np.ndarray) -> None:
        # Draw order per frame, as the official chain: crop, flip, erasing, channel op.
        exchange = modality == Modality.VISIBLE and rng.random() < self.channel_exchange_p
        height, width = self.image_size
        for t, frame in enumerate(frames):
            self._crop_flip(self._resize(frame), rng, pixels[t])
            if rng.random() < self.erase_p:
                box = erase_box(rng, height, width, self.erase_area)
                if box is not None:
                    boxes[t], fills[t] = box, self.erase_fill
            if exchange:
                channels[t] = int(rng.integers(3))
            elif modality == Modality.INFRARED:
                channels[t] = self._adaptive_gray(rng)

    def _crop_flip(self, array: np.ndarray, rng: np.random.Generator, out: np.ndarray) -> None:
        """Zero-pad by ``pad``, crop back at a random offset, maybe flip: written into the zeroed
        ``out`` without building the padded image."""
        height, width = array.shape[:2]
        top, left = (int(v) - self.pad for v in rng.integers(0, 2 * self.pad + 1, 2))
        flip = rng.random() < self.flip_p
        rows_out = slice(max(0, -top), min(height, height - top))
        rows_in = slice(max(0, top), min(height, height + top))
        a, b = max(0, -left), min(width, width - left)  # columns of the unflipped crop
        source = array[rows_in, max(0, left) : min(width, width + left)]
        if flip:
            out[rows_out, width - b : width - a] = source[:, ::-1]
        else:
            out[rows_out, a:b] = source

    def _adaptive_gray(self, rng: np.random.Generator) -> int:
        choice = int(rng.integers(4))
        if choice < 3:
            return choice
        return TO_LUMA if rng.random() < self.adaptive_gray_p else KEEP


@dataclass
class XReIDTransform(_Base):
    """X-ReID augmentation: clip-level flip, per-frame random-colour erasing (module docstring)."""

    flip_p: float = 0.5
    erase_p: float = 0.5
    erase_area: tuple[float, float] = (0.02, 0.2)

    def _fill(self, frames: list[Frame], modality: Modality, rng: np.random.Generator,
              pixels: np.ndarray, boxes: np.ndarray, fills: np.ndarray,
              channels: np.ndarray) -> None:
        flip = rng.random() < self.flip_p
        height, width = self.image_size
        for t, frame in enumerate(frames):
            array = self._resize(frame)
            pixels[t] = array[:, ::-1] if flip else array
            if rng.random() < self.erase_p:
                box = erase_box(rng, height, width, self.erase_area)
                if box is not None:
                    colour = rng.integers(0, 256, 3, dtype=np.uint8)
                    boxes[t], fills[t] = box, self._normalised(colour)


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
