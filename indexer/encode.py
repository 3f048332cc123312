"""``TrackletEncoder``: frames -> one retrieval vector per tracklet, as the checkpoint defines it.

The same object serves the offline build (many tracklets, decoding in a thread pool) and the
server (``prepare`` per request in worker threads, one ``encode_prepared`` per micro-batch), so a
tracklet indexed offline and the same frames posted to the server give the same vector: both go
through the checkpoint's own :class:`~model.preprocess.FramePreprocessor` (resize, normalisation,
test-time frame sampling), the model's ``encode``, the clip average and the normalisation its
``similarity`` asks for.

Indexing keeps the host light so that it keeps up with a GPU: decode threads produce resized uint8
pixels, normalised on the encode device (``decode="cpu"``), or only read the files while the JPEG
decode and the resize run batched on the device itself (``decode="device"``, nvJPEG on CUDA).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from vvireid.model.base import ReIDModel
from vvireid.model.device import resolve_device
from vvireid.model.inference import InferenceModel, buckets_up_to, parse_dtype
from vvireid.model.preprocess import (
    FrameError,
    FramePreprocessor,
    FrameSource,
    decode_jpegs,
    device_decodable,
    device_decoding_available,
    load_image,
    load_pixels,
    normalize_pixels,
    read_frame,
    resize_pixels,
    simplejpeg,
)
from vvireid.model.types import Modality, Tracklet

log = logging.getLogger(__name__)

THUMBNAIL_MAX_HEIGHT = 128
THUMBNAIL_QUALITY = 85
DECODE_MODES = ("auto", "cpu", "device")


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


@dataclass
class _Undecoded:
    """A tracklet read by a worker (``decode="device"``) whose JPEG frames await the device.

    ``jpegs``: sampled frame -> (its bytes, the name a failure reports); ``pixels``: frames that
    took the CPU path (not a plain JPEG), already resized to uint8 [H, W, 3].
    """

    tracklet: Tracklet
    indices: list[list[int]]
    wants_thumbnail: bool
    jpegs: dict[int, tuple[bytes, str]] = field(default_factory=dict)
    pixels: dict[int, np.ndarray] = field(default_factory=dict)
    thumbnail: bytes | None = None


def resolve_decode(mode: str, device: torch.device) -> str:
    """Where frames are decoded: ``cpu`` or ``device``.

    ``auto`` is ``device`` on CUDA when torchvision's JPEG decoder imports (nvJPEG decodes far
    faster than the host's cores can), ``cpu`` otherwise. ``device`` on a CPU encoder runs the
    same batched code with libjpeg (what the tests check).

    Raises:
        ValueError: an unknown mode, or ``device`` without torchvision's decoder.
    """
    if mode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {mode!r}; known: {', '.join(DECODE_MODES)}")
    if mode == "auto":
        return "device" if device.type == "cuda" and device_decoding_available() else "cpu"
    if mode == "device" and not device_decoding_available():
        raise ValueError(
            "decode='device' needs torchvision's decode_jpeg (torchvision.io); install "
            "torchvision or decode on the CPU (decode='cpu')"
        )
    return mode


def thumbnail_size(height: int, width: int, max_height: int = THUMBNAIL_MAX_HEIGHT) -> tuple[int, int]:
    """(height, width) of a frame's thumbnail: at most ``max_height`` high, aspect kept."""
    if height <= max_height:
        return height, width
    return max_height, max(1, round(width * max_height / height))


def jpeg_thumbnail(pixels: Image.Image | np.ndarray) -> bytes:
    """Thumbnail pixels (an RGB image or uint8 [h, w, 3]) as the stored JPEG bytes."""
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue()


def make_thumbnail(image: Image.Image, max_height: int = THUMBNAIL_MAX_HEIGHT) -> bytes:
    """A small JPEG of ``image`` (height at most ``max_height``, aspect kept)."""
    thumb = image.convert("RGB")
    height, width = thumbnail_size(thumb.height, thumb.width, max_height)
    if height != thumb.height:
        thumb = thumb.resize((width, height), Image.BILINEAR)
    return jpeg_thumbnail(thumb)


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
        decode: where :meth:`encode_tracklets` decodes frames (see :func:`resolve_decode`):
            ``cpu`` (worker threads decode and resize to uint8, the device normalises),
            ``device`` (workers only read files; plain JPEGs are decoded and resized batched on
            ``device``, any other frame on the CPU path) or ``auto``.
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
        decode: str = "auto",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.dtype = parse_dtype(dtype, self.device)
        self.decode = resolve_decode(decode, self.device)
        if self.decode == "device" and simplejpeg is None:
            log.warning("simplejpeg is not installed: no frame can be checked for the device "
                        "decoder, so every frame is decoded on the CPU")
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
        self._stream: Any = None  # the staging thread's CUDA stream, made on first use

    # ---- one request at a time (server) -------------------------------------------------------

    def prepare(
        self, frames: Sequence[FrameSource], names: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Decode and sample a tracklet's frames with the checkpoint's test-time rule.

        Shape: -> clips [C, T, 3, H, W] float32 (C = 1 except for the ``dense`` rule).

        Raises:
            FrameError: an undecodable frame (named by ``names`` or its path), or no frames.
        """
        return self.preprocessor.clips(frames, names)

    def prepare_with_thumbnail(
        self, frames: Sequence[FrameSource], names: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, bytes]:
        """``prepare`` plus a JPEG thumbnail of the middle sampled frame (decoded once)."""
        indices, wanted = self.preprocessor.sampled_frames(len(frames))
        images: list[Any] = list(frames)
        for i in wanted:
            images[i] = load_image(frames[i], names[i] if names is not None else None)
        clips = self.preprocessor.clips(images, names)
        return clips, make_thumbnail(images[thumbnail_frame(indices)])

    def prepare_pixels(
        self, frames: Sequence[FrameSource], names: Sequence[str] | None = None
    ) -> torch.Tensor:
        """``prepare`` without the normalisation: uint8 clips that :meth:`encode_prepared`
        normalises on the encode device (4x less memory and transfer, no float work here).

        Shape: -> clips [C, T, 3, H, W] uint8.

        Raises:
            FrameError: an undecodable frame (named by ``names`` or its path), or no frames.
        """
        return self.preprocessor.pixel_clips(frames, names)

    def prepare_pixels_with_thumbnail(
        self, frames: Sequence[FrameSource], names: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, bytes]:
        """``prepare_pixels`` plus a JPEG thumbnail of the middle sampled frame (decoded once)."""
        indices, wanted = self.preprocessor.sampled_frames(len(frames))
        decoded = {i: load_pixels(frames[i], names[i] if names is not None else None)
                   for i in wanted}
        thumbnail = make_thumbnail(Image.fromarray(decoded[thumbnail_frame(indices)]))
        pixels = {i: self.preprocessor.frame_pixels(a) for i, a in decoded.items()}
        return self.preprocessor.assemble(indices, pixels), thumbnail

    def encode_prepared(
        self, clip_sets: Sequence[torch.Tensor], camids: Sequence[int | None]
    ) -> np.ndarray:
        """Encode many prepared tracklets in as few model calls as ``batch_size`` allows.

        The clips of all items are concatenated and run in chunks of ``batch_size``; each item's
        vector comes from :func:`tracklet_features` (un-normalised clip features averaged, then
        L2-normalised when the model's similarity is cosine). Clip sets may be float (``prepare``)
        or uint8 (``prepare_pixels``, normalised on the device), on the CPU or on the device.

        Shape: clip_sets: n tensors [C_i, T, 3, H, W]; camids: n ints or None -> float32 [n, D].
        """
        if len(clip_sets) != len(camids):
            raise ValueError(f"{len(clip_sets)} clip sets but {len(camids)} camids")
        if not clip_sets:
            return np.zeros((0, self.dim), dtype=np.float32)
        counts = torch.tensor([c.shape[0] for c in clip_sets])
        owner = torch.repeat_interleave(torch.arange(len(clip_sets)), counts)
        clips = torch.cat(self._alike(clip_sets))
        clip_camids = [camids[i] for i in owner.tolist()]
        feats = torch.empty(len(clips), self.dim, dtype=torch.float32)
        with_cam = torch.tensor([c is not None for c in clip_camids])
        for group in (torch.nonzero(with_cam).flatten(), torch.nonzero(~with_cam).flatten()):
            if len(group):
                cams = [clip_camids[i] for i in group.tolist()]
                rows = clips if len(group) == len(clips) else clips[group.to(clips.device)]
                feats[group] = self._run(rows, None if cams[0] is None else cams)
        means = tracklet_features(feats, counts, self.similarity)
        return means.numpy().astype(np.float32, copy=False)

    def _alike(self, clip_sets: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Clip sets that one ``torch.cat`` can join: one dtype kind and one device.

        uint8 sets among float ones are normalised first (a cat would turn raw pixels into
        floats, unnormalised); sets on several devices all go to the encode device.
        """
        sets = list(clip_sets)
        if len({c.dtype == torch.uint8 for c in sets}) > 1:
            config = self.preprocessor.config
            sets = [normalize_pixels(c, config) if c.dtype == torch.uint8 else c for c in sets]
        if len({c.device for c in sets}) > 1:
            sets = [c.to(self.device) for c in sets]
        for c in sets:
            if c.device.type == "cuda":  # made on the decode stream, read on this one
                c.record_stream(torch.cuda.current_stream(c.device))
        return sets

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
        return self.encode_prepared([self.prepare_pixels(frames)], [camid])[0]

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

        A staging thread sits between the workers and the model: while this thread runs the
        model on one chunk, it puts the next chunk on the device (its own CUDA stream): with
        ``decode="cpu"`` one copy of the workers' uint8 clips (joined in pinned memory on CUDA),
        with ``decode="device"`` the batched JPEG decode and resize. The model's thread then
        finds its input on the device and does no host copies of its own.
        """
        tracklets = list(tracklets)
        chunk_size = chunk_size or self.batch_size * 4
        slices = [tracklets[i : i + chunk_size] for i in range(0, len(tracklets), chunk_size)]
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="vvireid-decode")
        stage = ThreadPoolExecutor(1, thread_name_prefix="vvireid-stage")
        pending: _Loading | None = None
        try:
            pending = self._submit(pool, stage, slices[0], thumbnails) if slices else None
            for n, chunk in enumerate(slices):
                current = pending
                pending = (
                    self._submit(pool, stage, slices[n + 1], thumbnails)
                    if n + 1 < len(slices) else None
                )
                assert current is not None
                yield self._encode_loaded(current.result(), start + n * chunk_size, len(chunk))
        finally:
            if pending is not None:
                pending.cancel()
            stage.shutdown(wait=True)
            pool.shutdown(wait=True)

    def _submit(
        self, pool: ThreadPoolExecutor, stage: ThreadPoolExecutor, chunk: list[Tracklet],
        thumbnails: bool,
    ) -> _Loading:
        items = [pool.submit(self._load, t, thumbnails) for t in chunk]
        return _Loading(items, stage.submit(self._stage, items, pool))

    def _load(self, tracklet: Tracklet, thumbnails: bool) -> _Prepared | _Undecoded | EncodeFailure:
        """Check and read one tracklet (runs in a worker thread); decode it unless the device
        will (``decode="device"``)."""
        where = _source_of(tracklet)
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
            if self.decode == "device":
                return self._read_for_device(tracklet, thumbnails)
            clips, thumb = self._prepare_on_cpu(tracklet.frames, thumbnails)
        except FrameError as exc:
            return EncodeFailure(tracklet.tracklet_id, exc.where, exc.reason)
        return _Prepared(tracklet, clips, thumb)

    def _prepare_on_cpu(
        self, frames: Sequence[FrameSource], thumbnails: bool
    ) -> tuple[torch.Tensor, bytes | None]:
        """A tracklet's uint8 clips (and thumbnail), decoded in this worker thread."""
        if thumbnails:
            return self.prepare_pixels_with_thumbnail(frames)
        return self.prepare_pixels(frames), None

    def _read_for_device(self, tracklet: Tracklet, thumbnails: bool) -> _Undecoded:
        """Read the sampled frames; plain JPEGs wait for the device, others decode here."""
        frames = tracklet.frames
        indices, wanted = self.preprocessor.sampled_frames(len(frames))
        item = _Undecoded(tracklet, indices, thumbnails)
        for i in wanted:
            where = str(frames[i]) if isinstance(frames[i], (str, Path)) else None
            data = read_frame(frames[i], where)
            if isinstance(data, bytes) and device_decodable(data):
                item.jpegs[i] = (data, where or "frame")
            else:
                self._decode_on_cpu(item, i, data, where)
        return item

    def _decode_on_cpu(self, item: _Undecoded, i: int, data: FrameSource, where: str | None) -> None:
        """The CPU path for one frame of a device-decoded tracklet (it names a bad file)."""
        decoded = load_pixels(data, where)
        if item.wants_thumbnail and i == thumbnail_frame(item.indices):
            item.thumbnail = make_thumbnail(Image.fromarray(decoded))
        item.pixels[i] = self.preprocessor.frame_pixels(decoded)

    def _stage(
        self, futures: list[Future[Any]], pool: ThreadPoolExecutor | None = None
    ) -> list[_Prepared | EncodeFailure]:
        """Put one chunk's clips on the device (see :meth:`encode_tracklets`).

        Runs in the staging thread and, on CUDA, on its own stream, which it synchronises
        before handing the clips over, so the model's stream reads finished pixels.
        """
        loaded = [f.result() for f in futures]
        if self.device.type != "cuda":
            return self._stage_items(loaded, pool)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream):
            done = self._stage_items(loaded, pool)
        self._stream.synchronize()
        return done

    def _stage_items(
        self, loaded: list[_Prepared | _Undecoded | EncodeFailure],
        pool: ThreadPoolExecutor | None = None,
    ) -> list[_Prepared | EncodeFailure]:
        """The staging thread's work on one chunk; ``pool`` (the decode threads, idle while
        the device decodes) encodes the thumbnails' JPEGs, inline without one."""
        # By what the workers made, not by the mode: the mode can fall back to the CPU while
        # a chunk read for the device is in flight (see _decode_items).
        if any(isinstance(x, _Undecoded) for x in loaded):
            return self._decode_items(loaded, pool)
        ready = [x for x in loaded if isinstance(x, _Prepared)]
        if ready:
            # One host copy into (pinned) memory and one transfer, not one per bucket later;
            # joined by numpy, as torch's cat would wake its intra-op threads beside the busy
            # decode threads.
            sets = [p.clips for p in ready]
            joined = torch.empty((sum(len(c) for c in sets), *sets[0].shape[1:]),
                                 dtype=sets[0].dtype, pin_memory=self.device.type == "cuda")
            np.concatenate([c.numpy() for c in sets], out=joined.numpy())
            on_device = joined.to(self.device, non_blocking=True)
            for item, clips in zip(ready, on_device.split([len(c) for c in sets]), strict=True):
                item.clips = clips
        return [x for x in loaded if not isinstance(x, _Undecoded)]

    def _decode_items(
        self, loaded: list[_Prepared | _Undecoded | EncodeFailure],
        pool: ThreadPoolExecutor | None,
    ) -> list[_Prepared | EncodeFailure]:
        jobs = [(k, i, data, where) for k, item in enumerate(loaded)
                if isinstance(item, _Undecoded) for i, (data, where) in item.jpegs.items()]
        decoded = decode_jpegs([job[2] for job in jobs], self.device)
        on_device: dict[tuple[int, int], torch.Tensor] = {}
        failed: dict[int, EncodeFailure] = {}
        declined = 0
        for (k, i, data, where), frame in zip(jobs, decoded, strict=True):
            item = loaded[k]
            assert isinstance(item, _Undecoded)
            if frame is not None:
                on_device[(k, i)] = frame
                continue
            declined += 1
            try:
                self._decode_on_cpu(item, i, data, where)
            except FrameError as exc:
                failed.setdefault(k, EncodeFailure(item.tracklet.tracklet_id, exc.where, exc.reason))
        if declined:
            log.warning("%d of %d JPEG frames could not be decoded on %s; decoded on the CPU",
                        declined, len(jobs), self.device)
        if jobs and declined == len(jobs) and self.decode == "device":
            # The device decodes nothing (no usable nvJPEG, say): one staging thread decoding
            # every frame would be far slower than the decode threads, so hand them the work.
            log.warning("the device declined every JPEG frame of a chunk: decoding on the CPU "
                        "(decode='cpu') from the next chunk on")
            self.decode = "cpu"
        thumbs = self._device_thumbnails(loaded, on_device, failed, pool)
        clips = self._lay_out_clips(loaded, on_device, failed)
        out: list[_Prepared | EncodeFailure] = []
        for k, item in enumerate(loaded):
            if not isinstance(item, _Undecoded):
                out.append(item)
            elif k in failed:
                out.append(failed[k])
            else:
                thumb = thumbs[k].result() if k in thumbs else item.thumbnail
                out.append(_Prepared(item.tracklet, clips[k], thumb))
        return out

    def _lay_out_clips(
        self, loaded: list[Any], on_device: dict[tuple[int, int], torch.Tensor],
        failed: dict[int, EncodeFailure],
    ) -> dict[int, torch.Tensor]:
        """Each decoded tracklet's clips, uint8 [C, T, 3, H, W] on the device: views of one
        gather over the chunk's frame table (one index copy and one kernel per chunk)."""
        table, rows = self._frame_table(loaded, on_device)
        ok = [k for k, item in enumerate(loaded) if isinstance(item, _Undecoded) and k not in failed]
        if not ok:
            return {}
        order = [rows[(k, i)] for k in ok for clip in loaded[k].indices for i in clip]
        frames = table[torch.tensor(order, device=table.device)]
        clips = frames.view(-1, self.preprocessor.config.seq_len, *frames.shape[1:])
        return dict(zip(ok, clips.split([len(loaded[k].indices) for k in ok]), strict=True))

    def _frame_table(
        self, loaded: list[Any], on_device: dict[tuple[int, int], torch.Tensor]
    ) -> tuple[torch.Tensor, dict[tuple[int, int], int]]:
        """Every sampled frame of the chunk resized, uint8 [N, 3, H, W] on the device, and the
        row of each (tracklet, frame): device-decoded frames first, then CPU-decoded ones."""
        size = tuple(self.preprocessor.config.image_size)
        keys = list(on_device)
        parts = [resize_pixels([on_device[key] for key in keys], size)] if keys else []
        host = [((k, i), p) for k, item in enumerate(loaded) if isinstance(item, _Undecoded)
                for i, p in item.pixels.items()]
        if host:
            stacked = np.stack([p.transpose(2, 0, 1) for _, p in host])
            parts.append(torch.from_numpy(stacked).to(self.device))
            keys += [key for key, _ in host]
        if not parts:
            return torch.empty(0, 3, *size, dtype=torch.uint8, device=self.device), {}
        return torch.cat(parts), {key: n for n, key in enumerate(keys)}

    def _device_thumbnails(
        self, loaded: list[Any], on_device: dict[tuple[int, int], torch.Tensor],
        failed: dict[int, EncodeFailure], pool: ThreadPoolExecutor | None,
    ) -> dict[int, Future[bytes]]:
        """JPEG thumbnails of the middle frames decoded on the device, resized there (one
        resize and one copy to the host per distinct frame size), encoded on the host by
        ``pool`` while this thread lays out the clips."""
        groups: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
        for k, item in enumerate(loaded):
            if not isinstance(item, _Undecoded) or not item.wants_thumbnail or k in failed:
                continue
            frame = on_device.get((k, thumbnail_frame(item.indices)))
            if frame is not None:
                groups.setdefault(tuple(frame.shape), []).append((k, frame))
        thumbs: dict[int, Future[bytes]] = {}
        for shape, members in groups.items():
            size = thumbnail_size(shape[1], shape[2])
            small = resize_pixels([frame for _, frame in members], size)
            for (k, _), pixels in zip(members, small.permute(0, 2, 3, 1).cpu().numpy(), strict=True):
                thumbs[k] = _run(pool, jpeg_thumbnail, pixels)
        return thumbs

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
                failures.append(EncodeFailure(
                    item.tracklet.tracklet_id, _source_of(item.tracklet), f"model rejected it: {exc}"
                ))
        vectors = np.concatenate(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)
        return kept, vectors, failures


def _source_of(tracklet: Tracklet) -> str:
    """Where a failure of ``tracklet`` points the user: its source (file or manifest line) or id."""
    return str((tracklet.extra or {}).get("source") or tracklet.tracklet_id)


def _run(pool: ThreadPoolExecutor | None, fn: Any, *args: Any) -> Future[Any]:
    """``fn(*args)`` in ``pool``, or here and now (as a finished future) without one."""
    if pool is not None:
        return pool.submit(fn, *args)
    done: Future[Any] = Future()
    done.set_result(fn(*args))
    return done


@dataclass
class _Loading:
    """One chunk in flight: its workers' futures and the staging thread's, which waits for them."""

    items: list[Future[Any]]
    staged: Future[Any]

    def result(self) -> list[_Prepared | EncodeFailure]:
        return self.staged.result()

    def cancel(self) -> None:
        for future in self.items:
            future.cancel()
        self.staged.cancel()
