"""``TrackletEncoder``: frames -> one retrieval vector per tracklet, as the checkpoint defines it.

The same object serves the offline build (many tracklets, decoding in a thread pool) and the
server (``prepare`` per request in worker threads, one ``encode_prepared`` per micro-batch), so a
tracklet indexed offline and the same frames posted to the server give the same vector: both go
through the checkpoint's own :class:`~model.preprocess.FramePreprocessor` (resize, normalisation,
test-time frame sampling), the model's ``encode``, the clip average and the normalisation its
``similarity`` asks for.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from vvireid.model.base import ReIDModel
from vvireid.model.device import resolve_device
from vvireid.model.inference import InferenceModel, buckets_up_to, parse_dtype
from vvireid.model.preprocess import FrameError, FramePreprocessor, FrameSource, load_image
from vvireid.model.types import Modality, Tracklet

log = logging.getLogger(__name__)

THUMBNAIL_MAX_HEIGHT = 128
THUMBNAIL_QUALITY = 85


@dataclass(frozen=True)
class EncodeFailure:
    """A tracklet that could not be encoded: which, where (file or manifest line) and why."""

    tracklet_id: str
    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"tracklet_id": self.tracklet_id, "path": self.path, "reason": self.reason}


@dataclass
class EncodedChunk:
    """The result of one consecutive slice of the input: encoded tracklets and failures.

    ``start`` and ``size`` locate the slice in the input sequence (for resumable builds).
    Shape: vectors [len(tracklets), D] float32.
    """

    start: int
    size: int
    tracklets: list[Tracklet]
    vectors: np.ndarray
    thumbnails: list[bytes | None]
    failures: list[EncodeFailure] = field(default_factory=list)


@dataclass
class _Prepared:
    tracklet: Tracklet
    clips: torch.Tensor
    thumbnail: bytes | None


def make_thumbnail(image: Image.Image, max_height: int = THUMBNAIL_MAX_HEIGHT) -> bytes:
    """A small JPEG of ``image`` (height at most ``max_height``, aspect kept)."""
    thumb = image.convert("RGB")
    if thumb.height > max_height:
        width = max(1, round(thumb.width * max_height / thumb.height))
        thumb = thumb.resize((width, max_height), Image.BILINEAR)
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue()


def thumbnail_frame(clip_indices: Sequence[Sequence[int]]) -> int:
    """The frame a tracklet's thumbnail shows: the middle frame of the middle test clip.

    One rule for the offline build and the server's queries, so a tracklet shows the same picture
    whichever way it entered the gallery; it is always a frame the sampling rule decodes anyway.
    """
    middle_clip = clip_indices[len(clip_indices) // 2]
    return middle_clip[len(middle_clip) // 2]


def tracklet_features(
    clip_feats: torch.Tensor, counts: Sequence[int] | torch.Tensor, similarity: str
) -> torch.Tensor:
    """One feature per tracklet from its clips' features: evaluation and the index share this.

    ``clip_feats`` are the model's *un-normalised* clip features (``encode(normalize=False)``),
    rows grouped by tracklet, ``counts[i]`` clips for tracklet i. Each group is averaged and the
    mean is then L2-normalised when the similarity is cosine. This is the official order of
    X-ReID's dense evaluator (average the post-BN clip features, then ``FEAT_NORM``); averaging
    clips that were normalised one by one would weight them equally whatever their norm and give
    a different vector. VLD ranks raw inner products, so its mean is left as it is (its official
    code has no multi-clip test feature; the raw mean is the only order consistent with it).
    With one clip per tracklet the result is exactly ``encode``'s.

    Shape: clip_feats [sum(counts), D] -> [len(counts), D] float32.
    """
    counts = torch.as_tensor(counts, dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
    feats = clip_feats.float().cpu()
    sums = torch.zeros(len(counts), feats.shape[1]).index_add_(0, owner, feats)
    means = sums / counts[:, None].clamp(min=1).to(sums.dtype)
    if similarity == "cosine":
        means = torch.nn.functional.normalize(means, dim=1)
    return means


class TrackletEncoder:
    """Encodes tracklets with a loaded model; see the module docstring.

    Args:
        model: a ``ReIDModel`` (from ``load_checkpoint``), moved to ``device`` in eval mode.
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda[:N]``.
        batch_size: clips per model call (the largest batch bucket).
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``: the dtype the
            weights are *stored* in (cast in place, see :class:`~model.inference.InferenceModel`).
        num_workers: decoding threads for :meth:`encode_tracklets` (default: min(4, cores)).
        compile: ``torch.compile`` the model over static batch buckets (default: on CUDA only;
            compiling on a CPU costs minutes for little gain). Call :meth:`warm_up` before
            serving so that no compilation happens on a request.
        buckets: the static batch sizes (default: powers of two up to ``batch_size``).
    """

    def __init__(
        self,
        model: ReIDModel,
        *,
        device: str = "auto",
        batch_size: int = 16,
        dtype: str = "auto",
        num_workers: int | None = None,
        compile: bool | None = None,
        buckets: Sequence[int] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.dtype = parse_dtype(dtype, self.device)
        self.batch_size = int(batch_size)
        self.runner = InferenceModel(
            model, self.device, dtype=self.dtype,
            compile=self.device.type == "cuda" if compile is None else compile,
            buckets=buckets or buckets_up_to(self.batch_size), normalize=False,
        )
        self.model = self.runner.model
        self.num_workers = num_workers or min(4, os.cpu_count() or 1)
        self.preprocessor = FramePreprocessor(model.preprocess)
        self.similarity: str = model.similarity
        self.dim: int = int(model.embed_dim)
        self.fingerprint: str | None = model.fingerprint

    # ---- one request at a time (server) -------------------------------------------------------

    def prepare(
        self, frames: Sequence[FrameSource], names: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Decode and sample a tracklet's frames with the checkpoint's test-time rule.

        Shape: -> clips [C, T, 3, H, W] (C = 1 except for the ``dense`` rule).

        Raises:
            FrameError: an undecodable frame (named by ``names`` or its path), or no frames.
        """
        return self.preprocessor.clips(frames, names)

    def prepare_with_thumbnail(
        self, frames: Sequence[FrameSource], names: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, bytes]:
        """``prepare`` plus a JPEG thumbnail of the middle sampled frame (decoded once)."""
        if len(frames) == 0:
            raise FrameError("tracklet", "has no frames")
        indices = self.preprocessor.clip_indices(len(frames))
        images: list[Any] = list(frames)
        for i in sorted({i for clip in indices for i in clip}):
            images[i] = load_image(frames[i], names[i] if names is not None else None)
        clips = self.preprocessor.clips(images, names)
        return clips, make_thumbnail(images[thumbnail_frame(indices)])

    def encode_prepared(
        self, clip_sets: Sequence[torch.Tensor], camids: Sequence[int | None]
    ) -> np.ndarray:
        """Encode many prepared tracklets in as few model calls as ``batch_size`` allows.

        The clips of all items are concatenated and run in chunks of ``batch_size``; each item's
        vector comes from :func:`tracklet_features` (un-normalised clip features averaged, then
        L2-normalised when the model's similarity is cosine).

        Shape: clip_sets: n tensors [C_i, T, 3, H, W]; camids: n ints or None -> float32 [n, D].
        """
        if len(clip_sets) != len(camids):
            raise ValueError(f"{len(clip_sets)} clip sets but {len(camids)} camids")
        if not clip_sets:
            return np.zeros((0, self.dim), dtype=np.float32)
        counts = torch.tensor([c.shape[0] for c in clip_sets])
        owner = torch.repeat_interleave(torch.arange(len(clip_sets)), counts)
        clips = torch.cat(list(clip_sets))
        clip_camids = [camids[i] for i in owner.tolist()]
        feats = torch.empty(len(clips), self.dim, dtype=torch.float32)
        with_cam = torch.tensor([c is not None for c in clip_camids])
        for group in (torch.nonzero(with_cam).flatten(), torch.nonzero(~with_cam).flatten()):
            if len(group):
                cams = [clip_camids[i] for i in group.tolist()]
                rows = clips if len(group) == len(clips) else clips[group]  # no copy if all
                feats[group] = self._run(rows, None if cams[0] is None else cams)
        means = tracklet_features(feats, counts, self.similarity)
        return means.numpy().astype(np.float32, copy=False)

    def _run(self, clips: torch.Tensor, camids: list[int] | None) -> torch.Tensor:
        """Un-normalised clip features, fp32 on the CPU [B, D], in bucket-sized model calls."""
        cams = None if camids is None else torch.tensor(camids, dtype=torch.long)
        return self.runner.encode(clips, cams)

    def warm_up(self) -> float:
        """Run (and, when compiled, compile) every batch bucket now; returns the seconds spent.

        Cameras are passed when the model has a camera table (X-ReID), as every real call will.
        """
        return self.runner.warm_up(with_camids=int(self.model.config.num_cameras) > 0)

    def close(self) -> None:
        """Release the inference thread of a compiled CUDA encoder (a no-op otherwise)."""
        self.runner.close()

    def encode_frames(self, frames: Sequence[FrameSource], camid: int | None = None) -> np.ndarray:
        """One tracklet's frames -> its vector [D] (float32)."""
        return self.encode_prepared([self.prepare(frames)], [camid])[0]

    # ---- many tracklets (build) ----------------------------------------------------------------

    def encode_tracklets(
        self,
        tracklets: Iterable[Tracklet],
        *,
        chunk_size: int | None = None,
        thumbnails: bool = True,
        start: int = 0,
    ) -> Iterator[EncodedChunk]:
        """Encode tracklets chunk by chunk; frames of the next chunk decode while this one runs.

        A tracklet that cannot be used (no frames, unreadable frame, bad modality or camid, or a
        model error on its own clips) becomes an :class:`EncodeFailure` naming the file and the
        reason; the others are encoded. ``start`` offsets the reported chunk positions.
        """
        tracklets = list(tracklets)
        chunk_size = chunk_size or self.batch_size * 4
        slices = [tracklets[i : i + chunk_size] for i in range(0, len(tracklets), chunk_size)]
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="vvireid-decode")
        pending: list[Future[Any]] = []
        try:
            pending = self._submit(pool, slices[0], thumbnails) if slices else []
            for n, chunk in enumerate(slices):
                current = pending
                pending = (
                    self._submit(pool, slices[n + 1], thumbnails) if n + 1 < len(slices) else []
                )
                loaded = [f.result() for f in current]
                yield self._encode_loaded(loaded, start + n * chunk_size, len(chunk))
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)

    def _submit(
        self, pool: ThreadPoolExecutor, chunk: list[Tracklet], thumbnails: bool
    ) -> list[Future[Any]]:
        return [pool.submit(self._load, t, thumbnails) for t in chunk]

    def _load(self, tracklet: Tracklet, thumbnails: bool) -> _Prepared | EncodeFailure:
        """Decode one tracklet (runs in a worker thread)."""
        where = str((tracklet.extra or {}).get("source") or tracklet.tracklet_id)
        try:
            Modality.parse(tracklet.modality)
        except ValueError as exc:
            return EncodeFailure(tracklet.tracklet_id, where, str(exc))
        camid = tracklet.camid
        if isinstance(camid, bool) or not isinstance(camid, (int, np.integer)) or camid < 0:
            return EncodeFailure(
                tracklet.tracklet_id, where, f"camid must be an integer >= 0, got {camid!r}"
            )
        if len(tracklet.frames) == 0:
            return EncodeFailure(tracklet.tracklet_id, where, "tracklet has no frames")
        try:
            if thumbnails:
                clips, thumb = self.prepare_with_thumbnail(tracklet.frames)
            else:
                clips, thumb = self.prepare(tracklet.frames), None
        except FrameError as exc:
            return EncodeFailure(tracklet.tracklet_id, exc.where, exc.reason)
        return _Prepared(tracklet, clips, thumb)

    def _encode_loaded(
        self, loaded: list[_Prepared | EncodeFailure], start: int, size: int
    ) -> EncodedChunk:
        failures = [x for x in loaded if isinstance(x, EncodeFailure)]
        ready = [x for x in loaded if isinstance(x, _Prepared)]
        try:
            vectors = self.encode_prepared(
                [p.clips for p in ready], [int(p.tracklet.camid) for p in ready]
            )
        except (ValueError, IndexError, RuntimeError) as exc:
            # One bad item (e.g. a camid outside the model's camera table) must not sink the chunk.
            log.warning("batched encoding failed (%s); encoding the chunk item by item", exc)
            ready, vectors, failures = self._encode_one_by_one(ready, failures)
        return EncodedChunk(
            start=start,
            size=size,
            tracklets=[p.tracklet for p in ready],
            vectors=vectors,
            thumbnails=[p.thumbnail for p in ready],
            failures=failures,
        )

    def _encode_one_by_one(
        self, ready: list[_Prepared], failures: list[EncodeFailure]
    ) -> tuple[list[_Prepared], np.ndarray, list[EncodeFailure]]:
        kept, rows = [], []
        for item in ready:
            try:
                rows.append(self.encode_prepared([item.clips], [int(item.tracklet.camid)]))
                kept.append(item)
            except (ValueError, IndexError, RuntimeError) as exc:
                where = str((item.tracklet.extra or {}).get("source") or item.tracklet.tracklet_id)
                failures.append(
                    EncodeFailure(item.tracklet.tracklet_id, where, f"model rejected it: {exc}")
                )
        vectors = np.concatenate(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)
        return kept, vectors, failures
