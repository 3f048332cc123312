"""Torch datasets that turn tracklets into clips: training pairs and test-time clips.

``TrainClipDataset`` is indexed by the :class:`~training.data.samplers.TrainKey` items a sampler
yields and returns one visible and one infrared clip of the same identity; the default collate
function stacks them to ``rgb``/``ir`` [B, T, 3, H, W]. With ``augment_on="device"`` an item holds
the transform's CPU part only (uint8 ``rgb``/``ir`` [T, H, W, 3] and ``rgb_plan``/``ir_plan``
:class:`~vvireid.training.data.transforms.AugmentPlan`), a quarter of the bytes to build, pickle
and copy; whoever receives the batch finishes it with ``transform.apply`` on its device (the
trainer: on the GPU, after the copy). ``TestClipDataset`` serves evaluation
through ``vvireid.model.preprocess.FramePreprocessor``, the code path the indexer and the server use.

Unreadable frames: ``on_bad_frame="fail"`` (default) raises ``FrameError`` naming the frame;
``"skip"`` logs the path, counts it in ``bad_frames`` (per worker process) and substitutes the
nearest readable frame of the same tracklet, raising only when none is readable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from vvireid.model.preprocess import FrameError, FramePreprocessor, load_image, load_pixels
from vvireid.model.sampling import sample_train
from vvireid.model.types import Modality, Tracklet
from vvireid.training.data.samplers import TrainKey

log = logging.getLogger(__name__)

BAD_FRAME_POLICIES = ("fail", "skip")
AUGMENT_ON = ("device", "worker")


class FrameLoader:
    """Decodes a tracklet's frames under a bad-frame policy, remembering frames found unreadable.

    ``pixels=True`` decodes to uint8 [h, w, 3] arrays (``load_pixels``: libjpeg-turbo straight to
    the array, the same pixels as the PIL image of ``load_image`` without its two copies).
    """

    def __init__(self, on_bad_frame: str = "fail", *, pixels: bool = False) -> None:
        if on_bad_frame not in BAD_FRAME_POLICIES:
            raise ValueError(
                f"on_bad_frame must be one of {BAD_FRAME_POLICIES}, got {on_bad_frame!r}"
            )
        self.on_bad_frame = on_bad_frame
        self._decode = load_pixels if pixels else load_image
        self.bad_frames = 0
        self._bad: set[str] = set()

    def load(self, tracklet: Tracklet, indices: Sequence[int]) -> dict[int, Image.Image | np.ndarray]:
        """Decoded images of the distinct ``indices`` (a substitute for each unreadable one)."""
        return {i: self._frame(tracklet, i) for i in sorted(set(indices))}

    def _frame(self, tracklet: Tracklet, index: int) -> Image.Image | np.ndarray:
        for candidate in self._candidates(len(tracklet), index):
            path = tracklet.frames[candidate]
            if path in self._bad:
                continue
            try:
                return self._decode(path)
            except FrameError as exc:
                if self.on_bad_frame == "fail":
                    raise
                self._bad.add(path)
                self.bad_frames += 1
                log.warning(
                    "skipping unreadable frame (tracklet %s): %s", tracklet.tracklet_id, exc
                )
        raise FrameError(f"tracklet {tracklet.tracklet_id}", "no readable frame left to substitute")

    @staticmethod
    def _candidates(n: int, index: int) -> list[int]:
        """``index`` then its neighbours by distance: i-1, i+1, i-2, i+2, ..."""
        out = [index]
        for step in range(1, n):
            out += [i for i in (index - step, index + step) if 0 <= i < n]
        return out


class _TrackletDataset(Dataset):
    """What both clip datasets share: one item per tracklet, frames read through a FrameLoader."""

    tracklets: list[Tracklet]
    frames: FrameLoader

    def __len__(self) -> int:
        return len(self.tracklets)

    @property
    def bad_frames(self) -> int:
        """Unreadable frames replaced by a neighbour so far (``on_bad_frame="skip"``)."""
        return self.frames.bad_frames


class TrainClipDataset(_TrackletDataset):
    """Training items: for a key (rgb, ir[, draw]) a visible and an infrared clip of one pid.

    Args:
        tracklets: ``DatasetSplits.train``; keys index it.
        transform: ``vvireid.training.data.transforms`` object (``pair`` / ``plan_pair`` used;
            it is given uint8 arrays) or any callable ``(frames, modality, rng) -> [T, 3, H, W]``
            (given PIL images).
        seq_len: T, frames per clip.
        sampling: ``rrs_train`` (VCM) or ``random_sorted`` (BUPTCampus), see ``vvireid.model.sampling``.
        aligned_pairs: the two tracklets are pixel-aligned twins (BUPT): one index set, drawn
            over the shorter length, serves both (the official loader uses the IR length).
        seed: mixed with each key's ``draw`` so that a run is reproducible.
        on_bad_frame: ``fail`` or ``skip`` (module docstring).
        augment_on: ``worker`` (float clips) or ``device`` (uint8 pixels and plans; needs a
            transform with ``plan_pair``, see the module docstring).

    Shape: ``rgb``, ``ir`` [T, 3, H, W] float (``worker``) or [T, H, W, 3] uint8 (``device``);
    ``pid``, ``rgb_camid``, ``ir_camid`` ints.
    """

    def __init__(
        self,
        tracklets: Sequence[Tracklet],
        transform: Any,
        *,
        seq_len: int,
        sampling: str = "rrs_train",
        aligned_pairs: bool = False,
        seed: int = 0,
        on_bad_frame: str = "fail",
        augment_on: str = "worker",
    ) -> None:
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on must be one of {AUGMENT_ON}, got {augment_on!r}")
        if augment_on == "device" and not hasattr(transform, "plan_pair"):
            raise ValueError(f"augment_on='device' needs a transform with a CPU/device split "
                             f"(plan_pair/apply); {type(transform).__name__} has none")
        self.tracklets = list(tracklets)
        self.augment_on = augment_on
        self.transform, self.seq_len, self.sampling = transform, seq_len, sampling
        self.aligned_pairs, self.seed = aligned_pairs, seed
        self.frames = FrameLoader(on_bad_frame, pixels=hasattr(transform, "plan_pair"))

    def _pair(self, key: Sequence[int]) -> tuple[Tracklet, Tracklet, np.random.Generator]:
        rgb_t, ir_t = self.tracklets[key[0]], self.tracklets[key[1]]
        if rgb_t.modality != Modality.VISIBLE or ir_t.modality != Modality.INFRARED:
            raise ValueError(f"key {tuple(key)}: expected (visible, infrared) tracklets")
        if rgb_t.pid != ir_t.pid:
            raise ValueError(f"key {tuple(key)}: pids differ ({rgb_t.pid} vs {ir_t.pid})")
        draw = key[2] if len(key) > 2 else (key[0] << 32) + key[1]
        return rgb_t, ir_t, np.random.default_rng([self.seed, int(draw)])

    def __getitem__(self, key: TrainKey | Sequence[int]) -> dict[str, Any]:
        rgb_t, ir_t, rng = self._pair(key)
        if self.aligned_pairs:
            rgb_idx = ir_idx = sample_train(
                min(len(rgb_t), len(ir_t)), self.seq_len, self.sampling, rng
            )
        else:
            rgb_idx = sample_train(len(rgb_t), self.seq_len, self.sampling, rng)
            ir_idx = sample_train(len(ir_t), self.seq_len, self.sampling, rng)
        rgb_images, ir_images = self.frames.load(rgb_t, rgb_idx), self.frames.load(ir_t, ir_idx)
        rgb_frames, ir_frames = [rgb_images[i] for i in rgb_idx], [ir_images[i] for i in ir_idx]
        plans: dict[str, Any] = {}
        if self.augment_on == "device":
            (rgb, plans["rgb_plan"]), (ir, plans["ir_plan"]) = self.transform.plan_pair(
                rgb_frames, ir_frames, rng)
        elif hasattr(self.transform, "pair"):
            rgb, ir = self.transform.pair(rgb_frames, ir_frames, rng)
        else:
            rgb = self.transform(rgb_frames, Modality.VISIBLE, rng)
            ir = self.transform(ir_frames, Modality.INFRARED, rng)
        return {
            "rgb": rgb,
            "ir": ir,
            **plans,
            "pid": int(rgb_t.pid),
            "rgb_camid": rgb_t.camid,
            "ir_camid": ir_t.camid,
            "rgb_index": int(key[0]),
            "ir_index": int(key[1]),
        }


class TestClipDataset(_TrackletDataset):
    """Evaluation clips of a tracklet list: item i is (clips [C, T, 3, H, W], i).

    C is 1 except for the ``dense`` rule; :func:`collate_test` batches variable C.
    """

    __test__ = False  # a dataset, not a pytest test class

    def __init__(
        self,
        tracklets: Sequence[Tracklet],
        preprocessor: FramePreprocessor,
        *,
        on_bad_frame: str = "fail",
    ) -> None:
        self.tracklets = list(tracklets)
        self.preprocessor = preprocessor
        self.frames = FrameLoader(on_bad_frame)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        tracklet = self.tracklets[index]
        if len(tracklet) == 0:
            raise FrameError(f"tracklet {tracklet.tracklet_id}", "has no frames")
        frames: list[Any] = list(tracklet.frames)
        if self.frames.on_bad_frame == "skip":
            wanted = [i for clip in self.preprocessor.clip_indices(len(frames)) for i in clip]
            for i, image in self.frames.load(tracklet, wanted).items():
                frames[i] = image
        return self.preprocessor.clips(frames, names=tracklet.frames), index


def collate_test(
    batch: Sequence[tuple[torch.Tensor, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate clips of several tracklets.

    Returns:
        clips [sum C, T, 3, H, W], counts [B] (clips per tracklet, to average features),
        indices [B].
    """
    clips = torch.cat([c for c, _ in batch])
    counts = torch.tensor([c.shape[0] for c, _ in batch])
    return clips, counts, torch.tensor([i for _, i in batch])
