"""The query engine: decode -> preprocess -> encode -> search, with no HTTP in sight.

Work is split by where it can run in parallel. Decoding and preprocessing happen in the caller's
thread (the server runs each request in its own thread), so many requests decode at once. The
model and the index are used by one worker thread only, fed by a :class:`MicroBatcher`, so
concurrent queries share one batched model call and (on a GPU) FAISS is never called from two
threads. Gallery writes are committed by the gallery store (one SQLite transaction) before they
are acknowledged; the store's own readers-writer lock keeps a search from seeing a half-applied
change, so this module adds no lock of its own. Changes committed by other processes (the
``vvireid-index`` CLI) are picked up by the store's background poller.

Errors raised here are :class:`ServiceError` subclasses carrying a stable ``code`` and the request
``part`` they concern; ``vvireid.server.errors`` maps them to HTTP statuses.
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
import re
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from vvireid.indexer.api import SearchOptions, refine_hits
from vvireid.indexer.calibration import Calibration, find_calibration
from vvireid.indexer.encode import TrackletEncoder, make_thumbnail, thumbnail_frame
from vvireid.indexer.gallery import GalleryUnavailableError, open_gallery
from vvireid.indexer.store import (
    GalleryBusyError,
    GalleryIndex,
    GalleryItem,
    GalleryWriteError,
    Hit,
    TrackletExistsError,
)
from vvireid.model.base import ReIDModel
from vvireid.model.checkpoint import load_checkpoint
from vvireid.model.preprocess import FrameError, decode_jpeg_rgb
from vvireid.model.types import Modality
from vvireid.server.batcher import BatcherClosedError, MicroBatcher, QueueFullError
from vvireid.server.memory import release_memory
from vvireid.server.settings import ServerSettings

log = logging.getLogger(__name__)

# Formats a browser or a camera pipeline sends; other decoders are never even tried.
FRAME_FORMATS = ("JPEG", "PNG", "WEBP")
TRACKLET_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")  # used with fullmatch
# Frames at least this many times the size the model needs are decoded at reduced size.
REDUCE_FROM = 4


class ServiceError(Exception):
    """A request the engine cannot serve; ``code`` is stable, ``part`` names the bad input."""

    code = "error"

    def __init__(self, message: str, *, part: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.part = part


class InvalidFrameError(ServiceError):
    code = "invalid_frame"


class FrameTooLargeError(ServiceError):
    code = "image_too_large"


class DecodeBudgetError(ServiceError):
    """The frames of one request together are over the decode budget (checked from headers)."""

    code = "decode_budget"


class NoFramesError(ServiceError):
    code = "no_frames"


class TooManyFramesError(ServiceError):
    code = "too_many_frames"


class InvalidFieldError(ServiceError):
    code = "invalid_field"


class NotReadyError(ServiceError):
    code = "not_ready"


class OverloadedError(ServiceError):
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueryTimeoutError(ServiceError):
    code = "timeout"


class UnknownTrackletError(ServiceError):
    code = "not_found"


class DuplicateTrackletError(ServiceError):
    code = "duplicate_tracklet"


class GalleryConflictError(ServiceError):
    code = "index_conflict"


@dataclass(frozen=True)
class FramePayload:
    """One uploaded frame: the client's file name (for messages only) and its bytes."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class QuerySpec:
    """What to search for a query tracklet.

    ``cross_modal`` searches the other modality's gallery (``ir_to_vis`` / ``vis_to_ir``), else the
    query's own. ``cameras`` restricts the gallery to these camids; ``camid`` is the query's own
    camera (camera-aware models such as X-ReID embed it).
    """

    modality: Modality
    top_k: int = 10
    cross_modal: bool = True
    cameras: tuple[int, ...] | None = None
    camid: int | None = None
    rerank: bool = False  # k-reciprocal re-ranking of the shortlist (vvireid.indexer.rerank)
    min_probability: float | None = None  # drop matches the calibration rates lower

    @property
    def gallery_modality(self) -> Modality:
        return self.modality.other if self.cross_modal else self.modality

    @property
    def options(self) -> SearchOptions:
        return SearchOptions(top_k=self.top_k, rerank=self.rerank,
                             min_probability=self.min_probability)


@dataclass(frozen=True)
class QueryResult:
    """Ranked gallery hits plus where the time went (milliseconds)."""

    hits: list[Hit]
    gallery_modality: Modality
    num_frames: int
    timings_ms: dict[str, float]
    batch_size: int
    similarities: list[float | None] = field(default_factory=list)
    probabilities: list[float | None] = field(default_factory=list)


@dataclass(frozen=True)
class _Job:
    """One tracklet for the batch worker; ``search`` None means encode only (gallery add)."""

    clips: torch.Tensor
    camid: int | None
    search: QuerySpec | None
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class _Outcome:
    feat: np.ndarray
    hits: list[Hit] | None
    queue_s: float
    encode_s: float
    search_s: float
    batch_size: int


def probe_frame(data: bytes, part: str, label: str, max_pixels: int) -> Image.Image:
    """Open one uploaded frame lazily: format and size come from the header, no pixel is decoded.

    Checking the pixel count here makes a small file that expands to gigabytes (a decompression
    bomb) cost nothing; PIL's own global limit is only a second guard.

    Raises:
        InvalidFrameError: empty, not JPEG/PNG/WebP, or an unreadable header.
        FrameTooLargeError: more than ``max_pixels`` pixels.
    """
    if not data:
        raise InvalidFrameError(f"{label}: empty file", part=part)
    try:
        image = Image.open(io.BytesIO(data), formats=FRAME_FORMATS)
    except Image.DecompressionBombError as exc:
        raise FrameTooLargeError(f"{label}: {exc}", part=part) from None
    except UnidentifiedImageError:
        raise InvalidFrameError(
            f"{label}: not a readable image (JPEG, PNG or WebP expected)", part=part
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidFrameError(f"{label}: truncated or corrupt image ({exc})", part=part) from None
    width, height = image.size
    if width * height > max_pixels:
        raise FrameTooLargeError(
            f"{label}: {width}x{height} = {width * height} pixels, above the limit of "
            f"{max_pixels} pixels per frame",
            part=part,
        )
    return image


def decode_frame(
    image: Image.Image,
    part: str,
    label: str,
    needed: tuple[int, int] | None = None,
    data: bytes | None = None,
) -> Image.Image:
    """Decode a probed frame to RGB, at reduced size when it is far larger than ``needed``.

    ``data`` (the frame's bytes) lets a JPEG of ordinary size go through libjpeg-turbo directly
    (:func:`~vvireid.model.preprocess.decode_jpeg_rgb`: PIL's pixels at about half the cost);
    anything it declines, truncated files included, is decoded by PIL, which names the problem.

    ``needed`` is the smallest (width, height) the caller uses. A frame at least ``REDUCE_FROM``
    times larger per side is decoded at no less than twice that size: JPEG scales in the decoder
    itself (draft mode, so the full-size pixels never exist); PNG and WebP are box-reduced right
    after decoding, so at most one full-size frame per request is alive. Frames of ordinary
    re-ID crop size are never reduced, so their features match the offline indexer's exactly.

    Raises:
        InvalidFrameError: truncated or corrupt image data.
    """
    source = image
    reduce = needed is not None and _reduce_factor(image.size, needed) > 1
    if data is not None and image.format == "JPEG" and not reduce:
        fast = decode_jpeg_rgb(data)
        if fast is not None:
            source.close()
            return fast
    try:
        if needed is not None and reduce and image.format == "JPEG":
            image.draft("RGB", (2 * needed[0], 2 * needed[1]))
        image.load()
        if needed is not None:
            factor = _reduce_factor(image.size, needed)
            if factor > 1:
                image = image.reduce(factor)
        return image.convert("RGB")  # always a new image: the source can be released
    except Image.DecompressionBombError as exc:
        raise FrameTooLargeError(f"{label}: {exc}", part=part) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidFrameError(f"{label}: truncated or corrupt image ({exc})", part=part) from None
    finally:
        source.close()  # frees the full-size pixels now, not when the request ends


def _reduce_factor(size: tuple[int, int], needed: tuple[int, int]) -> int:
    """Integer shrink factor that keeps at least twice ``needed`` per side (1 = keep as is)."""
    if min(size[0] // max(1, needed[0]), size[1] // max(1, needed[1])) < REDUCE_FROM:
        return 1
    return max(1, min(size[0] // (2 * needed[0]), size[1] // (2 * needed[1])))


def open_frame(
    data: bytes, part: str, label: str, max_pixels: int, needed: tuple[int, int] | None = None
) -> Image.Image:
    """Probe and decode one uploaded frame (see :func:`probe_frame` and :func:`decode_frame`)."""
    return decode_frame(probe_frame(data, part, label, max_pixels), part, label, needed, data)


class QueryEngine:
    """The loaded model and gallery index behind the server, plus the batch worker.

    Thread model: ``prepare`` runs in the caller's thread; ``encode_prepared`` and
    ``GalleryIndex.search`` run only in the batch worker; gallery writes run in the caller's
    thread and are serialised by the store.
    """

    def __init__(
        self,
        model: ReIDModel,
        encoder: TrackletEncoder,
        index: GalleryIndex,
        *,
        settings: ServerSettings | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        # The limits live in one place, ServerSettings; this class has no defaults of its own.
        settings = settings or ServerSettings()
        self.model = model
        self.encoder = encoder
        self.index = index
        self.calibration: Calibration | None = None  # set by load() from the checkpoint's
        self.max_frames = settings.max_frames
        self.max_image_pixels = settings.max_image_pixels
        self.max_request_pixels = settings.max_request_pixels
        self.request_timeout_s = settings.request_timeout_s
        self.thumbnail_height = settings.thumbnail_height
        height, width = model.config.image_size
        # The smallest decoded size that loses nothing: the model input and the thumbnail.
        self._needed = (width, max(height, self.thumbnail_height))
        # index_version counts gallery changes since load: the store's change counter (which
        # also counts other processes' commits) where it has one, else this server's writes.
        self._base_seq = getattr(index, "change_seq", 0)
        self._own_writes = 0
        self._preparing = 0  # requests decoding right now: they will want the next batch
        self._preparing_lock = threading.Lock()
        self._batcher: MicroBatcher[_Job, _Outcome] = MicroBatcher(
            self._process,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000.0,
            queue_size=settings.queue_size,
            on_batch=on_batch,
            expect_more=lambda: self._preparing > 0,
        )

    # ----------------------------------------------------------------- life cycle
    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        index_dir: str | Path,
        *,
        settings: ServerSettings | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> QueryEngine:
        """Load the checkpoint and the index made with it, warm the model up, start the worker.

        Raises:
            CheckpointError, IndexFormatError, IndexMismatchError: from the loaders, naming the
                file and the problem.
        """
        started = time.perf_counter()
        model = load_checkpoint(checkpoint)
        settings = settings or ServerSettings()
        device = settings.device
        encoder = TrackletEncoder(
            model, device=device, batch_size=settings.max_batch, dtype=settings.dtype,
            compile=settings.compile,
        )
        # The backend (FAISS folder or Milvus collection) comes from the settings; a Milvus
        # server that cannot be reached raises GalleryUnavailableError naming its URI.
        index = open_gallery(
            index_dir, settings.backend_options(), expected_fingerprint=model.fingerprint,
            expected_dim=encoder.dim, device=device,
        )
        engine = cls(model, encoder, index, settings=settings, on_batch=on_batch)
        engine.calibration = find_calibration(checkpoint, model.fingerprint)
        engine.warm_up()
        engine.start()
        log.info(
            "loaded %s model %s (fingerprint %s) and index %s (%d tracklets) in %.1f s",
            model.config.method, checkpoint, model.fingerprint, index_dir, len(index),
            time.perf_counter() - started,
        )
        return engine

    def start(self) -> QueryEngine:
        self._batcher.start()
        # Applies commits of other processes (CLI add/remove) and writes FAISS snapshots.
        start_background = getattr(self.index, "start_background", None)
        if start_background is not None:
            start_background()
        return self

    def close(self) -> None:
        """Stop the worker (queued requests are answered first), then release the gallery."""
        self._batcher.close()
        self.encoder.close()
        self.index.close()

    def warm_up(self) -> None:
        """Run every batch bucket once (compiling each when compiled) before any request.

        A compiled encoder pads each micro-batch to one of its buckets, so after this no request
        ever triggers a compilation.
        """
        self.encoder.warm_up()

    # ----------------------------------------------------------------- properties
    @property
    def fingerprint(self) -> str:
        return str(self.model.fingerprint)

    @property
    def num_cameras(self) -> int:
        return int(self.model.config.num_cameras)

    @property
    def queue_depth(self) -> int:
        return self._batcher.depth

    def __len__(self) -> int:
        return len(self.index)

    @property
    def version(self) -> int:
        """Gallery changes applied since this server loaded it (its own and other processes')."""
        seq = getattr(self.index, "change_seq", None)
        return self._own_writes if seq is None else seq - self._base_seq

    @property
    def index_state(self) -> tuple[int, int]:
        """(tracklets in the gallery, changes applied since load): cheap, per response."""
        return len(self.index), self.version

    def describe(self) -> dict[str, Any]:
        """The model and index facts (walks the whole gallery: for /v1/index, not per query)."""
        config = self.model.config
        stats = dict(self.index.stats())
        size = stats["count"]
        stats.pop("path", None)  # the server's file layout is not the client's business
        return {
            "model": {
                "method": config.method,
                "fingerprint": self.fingerprint,
                "backbone": config.backbone,
                "image_size": list(config.image_size),
                "seq_len": config.seq_len,
                "test_sampling": config.test_sampling,
                "num_cameras": config.num_cameras,
                "similarity": self.model.similarity,
            },
            "index": {**stats, "size": size, "version": self.version},
        }

    # ----------------------------------------------------------------- request side
    def prepare(self, frames: Sequence[FramePayload]) -> tuple[torch.Tensor, Image.Image]:
        """Check and decode every frame, then build the model's test-time clips.

        Every frame is decoded (a corrupt frame is an error even if sampling would skip it), but
        only the frames the sampling rule picks are kept as images, so memory stays at about
        ``seq_len`` decoded frames per request. Returns the uint8 clips [C, T, 3, H, W]
        (normalised on the encode device by the batch worker: a quarter of the queue's memory and
        of the transfer) and the frame used for the thumbnail.
        """
        if not frames:
            raise NoFramesError(
                "no frames: send 1 to "
                f"{self.max_frames} image files in the multipart field 'frames'",
                part="frames",
            )
        if len(frames) > self.max_frames:
            raise TooManyFramesError(
                f"too many frames: {len(frames)} sent, above the limit of {self.max_frames} "
                "frames per request (max_frames)",
                part="frames",
            )
        parts = [f"frames[{i}]" for i in range(len(frames))]
        labels = [
            f"{part} ({frame.filename})" if frame.filename else part
            for part, frame in zip(parts, frames, strict=True)
        ]
        indices = self.encoder.preprocessor.clip_indices(len(frames))
        wanted = {i for clip in indices for i in clip}
        middle = thumbnail_frame(indices)  # the offline indexer's choice
        probed = self._probe_all(frames, parts, labels)
        declared = sum(image.size[0] * image.size[1] for image in probed)
        sources: list[Any] = []
        thumb_source: Image.Image | None = None
        for i, frame in enumerate(frames):
            image = decode_frame(probed[i], parts[i], labels[i], self._needed, frame.data)
            if i == middle:
                thumb_source = image
            # Frames the sampling rule skips are passed as their (already verified) bytes; the
            # preprocessor never decodes them, so their pixels need not stay in memory.
            sources.append(image if i in wanted else frame.data)
        try:
            clips = self.encoder.prepare_pixels(sources, names=labels)
        except FrameError as exc:
            part = parts[labels.index(exc.where)] if exc.where in labels else "frames"
            raise InvalidFrameError(str(exc), part=part) from None
        finally:
            release_memory(declared)
        assert thumb_source is not None
        return clips, thumb_source

    def _probe_all(
        self, frames: Sequence[FramePayload], parts: list[str], labels: list[str]
    ) -> list[Image.Image]:
        """Read every frame's header and enforce the request's pixel budget before decoding.

        Raises:
            DecodeBudgetError: all frames together declare more than ``max_request_pixels``.
        """
        probed = [
            probe_frame(frame.data, parts[i], labels[i], self.max_image_pixels)
            for i, frame in enumerate(frames)
        ]
        total = sum(image.size[0] * image.size[1] for image in probed)
        if total > self.max_request_pixels:
            raise DecodeBudgetError(
                f"frames: {len(frames)} frames declare {total} pixels together, above the limit "
                f"of {self.max_request_pixels} pixels per request (max_request_pixels); send "
                "fewer or smaller frames",
                part="frames",
            )
        return probed

    def check_camid(self, camid: int | None, part: str = "camid") -> None:
        """A camera-aware model only knows camids ``0..num_cameras-1``."""
        if camid is None:
            return
        if camid < 0:
            raise InvalidFieldError(f"{part}: must be >= 0, got {camid}", part=part)
        if self.num_cameras and camid >= self.num_cameras:
            raise InvalidFieldError(
                f"{part}: {camid} is not a camera of this model (0..{self.num_cameras - 1})",
                part=part,
            )

    def query(self, frames: Sequence[FramePayload], spec: QuerySpec) -> QueryResult:
        """Rank gallery tracklets for one query tracklet."""
        started = time.perf_counter()
        self.check_camid(spec.camid)
        self._check_options(spec)
        with self._preparing_request():
            clips, _ = self.prepare(frames)
            decode_s = time.perf_counter() - started
            future = self._submit(_Job(clips, spec.camid, spec))
        outcome = self._wait(future)
        timings = {
            "decode": decode_s * 1000.0,
            "queue": outcome.queue_s * 1000.0,
            "encode": outcome.encode_s * 1000.0,
            "search": outcome.search_s * 1000.0,
        }
        assert outcome.hits is not None
        refine_started = time.perf_counter()
        hits, probabilities = self._refine(outcome.feat, outcome.hits, spec)
        timings["refine"] = (time.perf_counter() - refine_started) * 1000.0
        return QueryResult(
            hits=hits,
            probabilities=probabilities,
            gallery_modality=spec.gallery_modality,
            num_frames=len(frames),
            timings_ms=timings,
            batch_size=outcome.batch_size,
            similarities=self._similarities(outcome.feat, hits, spec),
        )

    def _check_options(self, spec: QuerySpec) -> None:
        if spec.min_probability is not None and self.calibration is None:
            raise InvalidFieldError(
                "min_probability: this model has no calibration; run `vvireid-train calibrate "
                "--checkpoint C --data-root D` (it writes <checkpoint>.calibration.json) and "
                "restart the server", part="min_probability")
        if spec.rerank and not hasattr(self.index, "vectors"):
            raise InvalidFieldError(
                "rerank: this gallery backend cannot return its vectors", part="rerank")

    def _refine(
        self, feat: np.ndarray, hits: list[Hit], spec: QuerySpec
    ) -> tuple[list[Hit], list[float | None]]:
        """Re-ranking, probabilities and ``min_probability`` (in the request's thread)."""
        matches = refine_hits(self.index, feat, hits, spec.options, self.calibration)
        kept = [
            Hit(m.rank, m.tracklet_id, m.score, m.modality, m.camid, m.camera, m.pid,
                m.timestamp)
            for m in matches
        ]
        return kept, [m.probability for m in matches]

    def _similarities(
        self, feat: np.ndarray, hits: Sequence[Hit], spec: QuerySpec
    ) -> list[float | None]:
        """Cosine similarity of the query and each hit's stored feature, in [-1, 1].

        Why not the score: an inner-product index (VLD, baseline) scores unnormalised features,
        and re-ranking replaces the score. The gallery vectors of the hits are read back (top_k
        of them); a cosine index without re-ranking already scores the cosine, so it skips that.
        None for every hit when the backend cannot return vectors, or a hit was removed meanwhile.
        """
        if not hits:
            return []
        if self.index.similarity == "cosine" and not spec.rerank:
            return [min(1.0, max(-1.0, float(hit.score))) for hit in hits]
        read = getattr(self.index, "vectors", None)
        if read is None:
            return [None] * len(hits)
        try:
            gallery = np.asarray(read([hit.tracklet_id for hit in hits]), dtype=np.float64)
        except KeyError:
            return [None] * len(hits)
        query = np.asarray(feat, dtype=np.float64).reshape(-1)
        norms = np.linalg.norm(gallery, axis=1) * max(float(np.linalg.norm(query)), 1e-12)
        cosines = gallery @ query / np.maximum(norms, 1e-12)
        return [float(c) for c in np.clip(cosines, -1.0, 1.0)]

    def add_tracklet(
        self,
        frames: Sequence[FramePayload],
        *,
        modality: Modality,
        camid: int,
        tracklet_id: str | None = None,
        camera: str | None = None,
        pid: int | None = None,
        timestamp: float | None = None,
    ) -> GalleryItem:
        """Encode a tracklet, add it to the gallery and save the index before returning."""
        tracklet_id = self._check_new_id(tracklet_id)
        self.check_camid(camid)
        with self._preparing_request():
            clips, middle = self.prepare(frames)
            future = self._submit(_Job(clips, camid, None))
        outcome = self._wait(future)
        item = GalleryItem(
            tracklet_id=tracklet_id, modality=modality, camid=camid, camera=camera, pid=pid,
            timestamp=timestamp,
            frames=tuple(f.filename for f in frames),
        )
        thumbnail = make_thumbnail(middle, self.thumbnail_height)
        try:
            self.index.add([item], outcome.feat[None, :], thumbnails=[thumbnail])
        except TrackletExistsError:
            raise DuplicateTrackletError(
                f"tracklet_id {tracklet_id!r} is already in the gallery", part="tracklet_id"
            ) from None
        except GalleryBusyError as exc:
            raise OverloadedError(str(exc), retry_after_s=2) from None
        except GalleryWriteError as exc:  # disk full, read-only: nothing changed, retry later
            raise GalleryUnavailableError(str(exc)) from None
        self._own_writes += 1
        log.info("added tracklet %s (%s, camid %d)", tracklet_id, modality.label, camid)
        return item

    def remove_tracklet(self, tracklet_id: str) -> None:
        """Remove a tracklet; returns once the removal is committed."""
        try:
            self.index.remove([tracklet_id])
        except KeyError:
            raise UnknownTrackletError(f"no tracklet {tracklet_id!r} in the gallery") from None
        except GalleryBusyError as exc:
            raise OverloadedError(str(exc), retry_after_s=2) from None
        except GalleryWriteError as exc:  # disk full, read-only: nothing changed, retry later
            raise GalleryUnavailableError(str(exc)) from None
        self._own_writes += 1
        log.info("removed tracklet %s", tracklet_id)

    def thumbnail(self, tracklet_id: str) -> bytes:
        """The JPEG thumbnail stored in the index for this id (never a file path from a client)."""
        if tracklet_id not in self.index:
            raise UnknownTrackletError(f"no tracklet {tracklet_id!r} in the gallery")
        data = self.index.thumbnail(tracklet_id)
        if data is None:
            raise UnknownTrackletError(f"tracklet {tracklet_id!r} has no thumbnail")
        return data

    def _check_new_id(self, tracklet_id: str | None) -> str:
        if tracklet_id is None or tracklet_id == "":
            return f"api-{uuid.uuid4().hex[:16]}"
        if not TRACKLET_ID_PATTERN.fullmatch(tracklet_id):
            raise InvalidFieldError(
                "tracklet_id: 1-128 characters from letters, digits and . _ : @ + -, "
                f"starting with a letter or digit; got {tracklet_id!r}",
                part="tracklet_id",
            )
        return tracklet_id

    @contextmanager
    def _preparing_request(self) -> Iterator[None]:
        """Count a request as "on its way to the batcher" while it decodes."""
        with self._preparing_lock:
            self._preparing += 1
        try:
            yield
        finally:
            with self._preparing_lock:
                self._preparing -= 1

    def _submit(self, job: _Job) -> concurrent.futures.Future:
        try:
            return self._batcher.submit(job)
        except QueueFullError as exc:
            raise OverloadedError(str(exc), retry_after_s=1) from None
        except BatcherClosedError as exc:
            raise NotReadyError(str(exc)) from None

    def _wait(self, future: concurrent.futures.Future) -> _Outcome:
        try:
            return future.result(timeout=self.request_timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise QueryTimeoutError(
                f"the model did not answer within {self.request_timeout_s:.0f} s"
            ) from None
        except BatcherClosedError as exc:
            raise NotReadyError(str(exc)) from None

    # ----------------------------------------------------------------- worker side
    def _process(self, jobs: list[_Job]) -> list[_Outcome | BaseException]:
        """Batch worker: one model call for all jobs, then one search per gallery filter."""
        try:
            return self._process_batch(jobs)
        except Exception:
            if len(jobs) == 1:
                raise
            # Something in one job broke the shared call: retry one by one so only it fails.
            log.exception("batch of %d failed; retrying its jobs one by one", len(jobs))
            results: list[_Outcome | BaseException] = []
            for job in jobs:
                try:
                    results += self._process_batch([job])
                except Exception as exc:  # noqa: BLE001 - reported to that job's caller
                    results.append(exc)
            return results

    def _process_batch(self, jobs: list[_Job]) -> list[_Outcome]:
        start = time.perf_counter()
        feats = self.encoder.encode_prepared([j.clips for j in jobs], [j.camid for j in jobs])
        encode_s = time.perf_counter() - start
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            if job.search is not None:
                groups[(job.search.gallery_modality, job.search.cameras)].append(i)
        hits: dict[int, list[Hit]] = {}
        search_s: dict[int, float] = {}
        for (modality, cameras), rows in groups.items():
            t0 = time.perf_counter()
            k = max(jobs[i].search.options.fetch_k for i in rows)
            found = self.index.search(
                feats[rows], k, modality=modality, camids=list(cameras) if cameras else None
            )
            elapsed = time.perf_counter() - t0
            for i, row_hits in zip(rows, found, strict=True):
                hits[i] = row_hits[: jobs[i].search.options.fetch_k]
                search_s[i] = elapsed
        return [
            _Outcome(
                feat=feats[i],
                hits=hits.get(i),
                queue_s=start - job.queued_at,
                encode_s=encode_s,
                search_s=search_s.get(i, 0.0),
                batch_size=len(jobs),
            )
            for i, job in enumerate(jobs)
        ]
