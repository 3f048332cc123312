"""The query engine: decode -> preprocess -> encode -> search, with no HTTP in sight.

Work is split by where it can run in parallel. Decoding and preprocessing happen in the caller's
thread (the server runs each request in its own thread), so many requests decode at once. The
model and the index are used by one worker thread only, fed by a :class:`MicroBatcher`, so
concurrent queries share one batched model call and (on a GPU) FAISS is never called from two
threads. Gallery writes take the write side of a readers-writer lock, so a search never sees a
half-applied change, and are saved atomically before they are acknowledged.

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
from vvireid.indexer.encode import TrackletEncoder, make_thumbnail, thumbnail_frame
from vvireid.indexer.store import GalleryIndex, GalleryItem, Hit, IndexConflictError
from vvireid.model.base import ReIDModel
from vvireid.model.checkpoint import load_checkpoint
from vvireid.model.preprocess import FrameError
from vvireid.model.types import Modality
from vvireid.server.batcher import BatcherClosedError, MicroBatcher, QueueFullError

log = logging.getLogger(__name__)

# Formats a browser or a camera pipeline sends; other decoders are never even tried.
FRAME_FORMATS = ("JPEG", "PNG", "WEBP")
TRACKLET_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")


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

    @property
    def gallery_modality(self) -> Modality:
        return self.modality.other if self.cross_modal else self.modality


@dataclass(frozen=True)
class QueryResult:
    """Ranked gallery hits plus where the time went (milliseconds)."""

    hits: list[Hit]
    gallery_modality: Modality
    num_frames: int
    timings_ms: dict[str, float]
    batch_size: int


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


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def open_frame(data: bytes, part: str, label: str, max_pixels: int) -> Image.Image:
    """Decode one uploaded frame to RGB, refusing anything not worth decoding.

    The pixel count is checked from the header before any pixel is decoded, so a small file that
    expands to gigabytes (a decompression bomb) costs nothing; PIL's own global limit is only a
    second guard.

    Raises:
        InvalidFrameError: empty, not JPEG/PNG/WebP, truncated or corrupt.
        FrameTooLargeError: more than ``max_pixels`` pixels.
    """
    if not data:
        raise InvalidFrameError(f"{label}: empty file", part=part)
    try:
        image = Image.open(io.BytesIO(data), formats=FRAME_FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise FrameTooLargeError(
                f"{label}: {width}x{height} = {width * height} pixels, above the limit of "
                f"{max_pixels} pixels per frame",
                part=part,
            )
        image.load()
        return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise FrameTooLargeError(f"{label}: {exc}", part=part) from None
    except UnidentifiedImageError:
        raise InvalidFrameError(
            f"{label}: not a readable image (JPEG, PNG or WebP expected)", part=part
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidFrameError(f"{label}: truncated or corrupt image ({exc})", part=part) from None


class QueryEngine:
    """The loaded model and gallery index behind the server, plus the batch worker.

    Thread model: ``prepare`` runs in the caller's thread; ``encode_prepared`` and
    ``GalleryIndex.search`` run only in the batch worker; gallery writes run in the caller's
    thread under the write lock.
    """

    def __init__(
        self,
        model: ReIDModel,
        encoder: TrackletEncoder,
        index: GalleryIndex,
        *,
        max_frames: int = 64,
        max_image_pixels: int = 4096 * 4096,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        queue_size: int = 64,
        request_timeout_s: float = 60.0,
        thumbnail_height: int = 128,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.model = model
        self.encoder = encoder
        self.index = index
        self.max_frames = max_frames
        self.max_image_pixels = max_image_pixels
        self.request_timeout_s = request_timeout_s
        self.thumbnail_height = thumbnail_height
        self.version = 0
        self._lock = ReadWriteLock()
        self._preparing = 0  # requests decoding right now: they will want the next batch
        self._preparing_lock = threading.Lock()
        self._batcher: MicroBatcher[_Job, _Outcome] = MicroBatcher(
            self._process,
            max_batch=max_batch,
            max_wait_s=max_wait_ms / 1000.0,
            queue_size=queue_size,
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
        device: str = "auto",
        **options: Any,
    ) -> QueryEngine:
        """Load the checkpoint and the index made with it, warm the model up, start the worker.

        Raises:
            CheckpointError, IndexFormatError, IndexMismatchError: from the loaders, naming the
                file and the problem.
        """
        started = time.perf_counter()
        model = load_checkpoint(checkpoint)
        encoder = TrackletEncoder(model, device=device, batch_size=options.get("max_batch", 16))
        index = GalleryIndex.open(
            index_dir, expected_fingerprint=model.fingerprint, expected_dim=encoder.dim,
            device=device,
        )
        engine = cls(model, encoder, index, **options)
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
        return self

    def close(self) -> None:
        """Stop the worker; queued requests are answered first."""
        self._batcher.close()

    def warm_up(self) -> None:
        """One model call on a blank clip, so the first user request does not pay for it."""
        height, width = self.model.config.image_size
        clip = torch.zeros(1, self.model.seq_len, 3, height, width)
        self.encoder.encode_prepared([clip], [0 if self.num_cameras else None])

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
    def index_state(self) -> tuple[int, int]:
        """(tracklets in the gallery, changes made through this server): cheap, per response."""
        return len(self.index), self.version

    def describe(self) -> dict[str, Any]:
        """The model and index facts (walks the whole gallery: for /v1/index, not per query)."""
        config = self.model.config
        with self._lock.read():
            stats = dict(self.index.stats())
            size = len(self.index)
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
        ``seq_len`` decoded frames per request. Returns the clips [C, T, 3, H, W] and the frame
        used for the thumbnail.
        """
        if not frames:
            raise NoFramesError(
                "no frames: send 1 to "
                f"{self.max_frames} image files in the multipart field 'frames'",
                part="frames",
            )
        if len(frames) > self.max_frames:
            raise TooManyFramesError(
                f"too many frames: {len(frames)} sent, at most {self.max_frames} per request",
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
        sources: list[Any] = []
        thumb_source: Image.Image | None = None
        for i, frame in enumerate(frames):
            image = open_frame(frame.data, parts[i], labels[i], self.max_image_pixels)
            if i == middle:
                thumb_source = image
            # Frames the sampling rule skips are passed as their (already verified) bytes; the
            # preprocessor never decodes them, so their pixels need not stay in memory.
            sources.append(image if i in wanted else frame.data)
        try:
            clips = self.encoder.prepare(sources, names=labels)
        except FrameError as exc:
            part = parts[labels.index(exc.where)] if exc.where in labels else "frames"
            raise InvalidFrameError(str(exc), part=part) from None
        assert thumb_source is not None
        return clips, thumb_source

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
        return QueryResult(
            hits=outcome.hits,
            gallery_modality=spec.gallery_modality,
            num_frames=len(frames),
            timings_ms=timings,
            batch_size=outcome.batch_size,
        )

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
        with self._lock.write():
            if tracklet_id in self.index:
                raise DuplicateTrackletError(
                    f"tracklet_id {tracklet_id!r} is already in the gallery", part="tracklet_id"
                )
            self.index.add([item], outcome.feat[None, :], thumbnails=[thumbnail])
            try:
                self._save()
            except Exception:
                self.index.remove([tracklet_id])  # keep memory equal to what is on disk
                raise
            self.version += 1
        log.info("added tracklet %s (%s, camid %d)", tracklet_id, modality.label, camid)
        return item

    def remove_tracklet(self, tracklet_id: str) -> None:
        """Remove a tracklet and save the index before returning."""
        with self._lock.write():
            if tracklet_id not in self.index:
                raise UnknownTrackletError(f"no tracklet {tracklet_id!r} in the gallery")
            self.index.remove([tracklet_id])
            self._save()
            self.version += 1
        log.info("removed tracklet %s", tracklet_id)

    def _save(self) -> None:
        try:
            self.index.save()
        except IndexConflictError as exc:
            raise GalleryConflictError(
                f"{exc}. Another process changed the gallery; restart this server to reload it"
            ) from None

    def thumbnail(self, tracklet_id: str) -> bytes:
        """The JPEG thumbnail stored in the index for this id (never a file path from a client)."""
        with self._lock.read():
            if tracklet_id not in self.index:
                raise UnknownTrackletError(f"no tracklet {tracklet_id!r} in the gallery")
            data = self.index.thumbnail(tracklet_id)
        if data is None:
            raise UnknownTrackletError(f"tracklet {tracklet_id!r} has no thumbnail")
        return data

    def _check_new_id(self, tracklet_id: str | None) -> str:
        if tracklet_id is None or tracklet_id == "":
            return f"api-{uuid.uuid4().hex[:16]}"
        if not TRACKLET_ID_PATTERN.match(tracklet_id):
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
        with self._lock.read():
            for (modality, cameras), rows in groups.items():
                t0 = time.perf_counter()
                k = max(jobs[i].search.top_k for i in rows)
                found = self.index.search(
                    feats[rows], k, modality=modality, camids=list(cameras) if cameras else None
                )
                elapsed = time.perf_counter() - t0
                for i, row_hits in zip(rows, found, strict=True):
                    hits[i] = row_hits[: jobs[i].search.top_k]
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
