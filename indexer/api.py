"""The Python API: load a checkpoint, encode tracklets, open a gallery, search it.

    from vvireid.indexer.api import ReID

    reid = ReID.load("model.safetensors", device="cpu")
    feats = reid.encode([["a/0.jpg", "a/1.jpg"], ["b/0.jpg"]])      # [2, D] numpy
    reid.open_gallery("gallery-index/")
    for match in reid.search(["q/0.jpg", "q/1.jpg"], modality="infrared", top_k=5):
        print(match.rank, match.tracklet_id, match.score, match.probability)

Why a thin layer: every path goes through :class:`~vvireid.indexer.encode.TrackletEncoder` (the
checkpoint's own preprocessing, test-time frame sampling, clip averaging and normalisation), so a
vector from this API equals the one ``vvireid-index`` stored and the one the server computes for
the same frames. The search options (re-ranking, calibrated probabilities, ``min_probability``)
are applied by :func:`refine_hits`, which the server uses too.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from vvireid.indexer.calibration import Calibration, find_calibration
from vvireid.indexer.encode import TrackletEncoder
from vvireid.indexer.gallery import BackendOptions, GalleryBackend, open_gallery
from vvireid.indexer.rerank import RerankParams, rerank_hits
from vvireid.indexer.store import Hit
from vvireid.model.checkpoint import load_checkpoint
from vvireid.model.preprocess import FrameSource
from vvireid.model.types import Modality

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# One tracklet: a folder of frames, a list of frames, or an array/tensor of frames [T, ...].
TrackletInput = Union[str, Path, Sequence[FrameSource], np.ndarray, torch.Tensor]


@dataclass(frozen=True)
class Match(Hit):
    """A :class:`Hit` plus, when the checkpoint is calibrated, P(same person)."""

    probability: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "probability": self.probability}


@dataclass(frozen=True)
class SearchOptions:
    """Post-processing of a query's hits: re-ranking and a calibrated probability floor."""

    top_k: int = 10
    rerank: bool = False
    rerank_params: RerankParams = RerankParams()
    min_probability: float | None = None

    @property
    def fetch_k(self) -> int:
        """How many hits to ask the index for: the re-ranking shortlist when re-ranking."""
        return max(self.top_k, self.rerank_params.shortlist) if self.rerank else self.top_k


def refine_hits(
    index: GalleryBackend,
    query: np.ndarray,
    hits: Sequence[Hit],
    options: SearchOptions,
    calibration: Calibration | None,
) -> list[Match]:
    """Re-rank (optionally), attach probabilities, drop those under ``min_probability``, keep top_k.

    Raises:
        ValueError: ``min_probability`` without a calibration (``vvireid-train calibrate``).
    """
    if options.min_probability is not None and calibration is None:
        raise ValueError(
            "min_probability needs a calibration: run `vvireid-train calibrate --checkpoint C "
            "--data-root D` (it writes <checkpoint>.calibration.json)"
        )
    if options.rerank:
        hits = rerank_hits(index, query, hits, len(hits), options.rerank_params)
    probabilities: list[float | None] = [None] * len(hits)
    if calibration is not None and hits:
        probabilities = calibration.probability([h.score for h in hits]).tolist()
    kept = [
        (hit, p) for hit, p in zip(hits, probabilities, strict=True)
        if options.min_probability is None or p >= options.min_probability
    ][: options.top_k]
    return [
        Match(rank, hit.tracklet_id, float(hit.score), hit.modality, hit.camid, hit.camera,
              hit.pid, hit.timestamp, probability=p)
        for rank, (hit, p) in enumerate(kept, start=1)
    ]


def _frames_of(tracklet: Any, where: str) -> list[FrameSource]:
    """The frames of one tracklet input, as what ``FramePreprocessor`` reads."""
    if isinstance(tracklet, (str, Path)):
        folder = Path(tracklet)
        if not folder.is_dir():
            raise ValueError(f"{where}: {folder} is not a folder of frames (pass a list of paths "
                             "for a tracklet of files)")
        frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not frames:
            raise ValueError(f"{where}: {folder} holds no {'/'.join(IMAGE_SUFFIXES)} frames")
        return [str(p) for p in frames]
    if isinstance(tracklet, torch.Tensor):
        tracklet = _tensor_frames(tracklet, where)
    if isinstance(tracklet, np.ndarray):
        if tracklet.ndim not in (3, 4):
            raise ValueError(f"{where}: an array tracklet must be [T, H, W] or [T, H, W, C], "
                             f"got shape {list(tracklet.shape)}")
        if tracklet.dtype != np.uint8:
            raise ValueError(f"{where}: array frames must be uint8 pixels, got {tracklet.dtype}")
        return list(tracklet)
    if isinstance(tracklet, Sequence) and not isinstance(tracklet, (str, bytes)):
        return list(tracklet)
    raise TypeError(f"{where}: cannot read a tracklet from {type(tracklet).__name__}")


def _tensor_frames(frames: torch.Tensor, where: str) -> np.ndarray:
    """[T, 3, H, W] (uint8, or float in [0, 1] as torchvision's ToTensor gives) -> uint8 [T,H,W,3]."""
    if frames.ndim != 4 or frames.shape[1] not in (1, 3):
        raise ValueError(f"{where}: a tensor tracklet must be [T, 3, H, W], got "
                         f"{list(frames.shape)}")
    frames = frames.detach().cpu()
    if frames.is_floating_point():
        frames = (frames.clamp(0, 1) * 255).round()
    return frames.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _is_batch(tracklets: Any) -> bool:
    """A batch is a 5-D array/tensor or a list whose items are themselves tracklets."""
    if isinstance(tracklets, (np.ndarray, torch.Tensor)):
        return tracklets.ndim == 5
    if isinstance(tracklets, (str, Path, bytes)) or not isinstance(tracklets, Sequence):
        return False
    if len(tracklets) == 0:
        return False
    first = tracklets[0]
    if isinstance(first, (np.ndarray, torch.Tensor)):
        return first.ndim == 4 or (first.ndim == 3 and first.shape[-1] not in (1, 3))
    if isinstance(first, (str, Path)):
        return Path(first).is_dir()
    return isinstance(first, Sequence) and not isinstance(first, bytes)


class ReID:
    """A loaded re-ID model: encode tracklets, open a gallery index, search it.

    Build it with :meth:`load`. A calibration beside the checkpoint
    (``<checkpoint>.calibration.json``, from ``vvireid-train calibrate``) is picked up so search
    results carry ``probability``.
    """

    def __init__(self, encoder: TrackletEncoder, calibration: Calibration | None = None) -> None:
        self.encoder = encoder
        self.calibration = calibration
        self.gallery: GalleryBackend | None = None

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        *,
        device: str = "auto",
        batch_size: int = 16,
        dtype: str = "auto",
        calibration: str | Path | None = None,
    ) -> ReID:
        """Load a ``.safetensors`` checkpoint written by ``vvireid-train``.

        Raises:
            CheckpointError: the file is missing or not a usable checkpoint.
            CalibrationError: the calibration file is unreadable or of another model.
        """
        model = load_checkpoint(checkpoint)
        encoder = TrackletEncoder(model, device=device, batch_size=batch_size, dtype=dtype)
        if calibration is not None:
            found = Calibration.load(calibration, model.fingerprint)
        else:
            found = find_calibration(checkpoint, model.fingerprint)
        return cls(encoder, found)

    @property
    def dim(self) -> int:
        """The feature width D."""
        return self.encoder.dim

    def encode(self, tracklets: Any, camid: int | Sequence[int] | None = None) -> np.ndarray:
        """Features of one tracklet ([D]) or of a batch of tracklets ([N, D]), float32.

        A tracklet is a folder of frames, a list of frames (paths, PIL images, HxWx3 uint8
        arrays, encoded bytes), a uint8 array [T, H, W, 3], or a tensor [T, 3, H, W] (uint8, or
        float in [0, 1]). A batch is a list of tracklets or a 5-D array/tensor. ``camid`` (one,
        or one per tracklet) matters only to camera-aware models such as X-ReID.

        Raises:
            FrameError: an unreadable frame (named); ValueError/TypeError: a malformed input.
        """
        batch = _is_batch(tracklets)
        items = list(tracklets) if batch else [tracklets]
        camids = list(camid) if isinstance(camid, Sequence) else [camid] * len(items)
        if len(camids) != len(items):
            raise ValueError(f"{len(items)} tracklets but {len(camids)} camids")
        clips = [
            self.encoder.prepare_pixels(_frames_of(t, f"tracklet {i}"))
            for i, t in enumerate(items)
        ]
        feats = self.encoder.encode_prepared(clips, camids)
        return feats if batch else feats[0]

    def open_gallery(
        self, path: str | Path, *, device: str = "cpu", options: BackendOptions | None = None
    ) -> GalleryBackend:
        """Open a gallery built with this checkpoint (``vvireid-index build``): a FAISS index
        folder, or a Milvus collection with ``options=BackendOptions(backend="milvus", ...)``.

        Raises:
            IndexMismatchError: the gallery was built with another model.
            IndexFormatError: a missing or corrupt index file.
        """
        self.gallery = open_gallery(
            path, options, expected_fingerprint=self.encoder.fingerprint, expected_dim=self.dim,
            device=device,
        )
        return self.gallery

    def search(
        self,
        tracklet: Any,
        *,
        modality: Modality | str | None = None,
        top_k: int = 10,
        cross_modal: bool = True,
        camid: int | None = None,
        cameras: Collection[int] | None = None,
        rerank: bool = False,
        rerank_params: RerankParams | None = None,
        min_probability: float | None = None,
    ) -> list[Match]:
        """Rank the open gallery for one query tracklet (frames or a feature vector [D]).

        ``modality`` is the query's: with ``cross_modal`` (default) an infrared query searches
        the visible gallery and vice versa; without it, the query's own modality. None searches
        every item. ``cameras`` restricts the gallery cameras, ``rerank`` applies k-reciprocal
        re-ranking to a shortlist, ``min_probability`` drops matches the calibration rates lower.

        Raises:
            RuntimeError: no gallery is open. ValueError: ``min_probability`` without calibration.
        """
        if self.gallery is None:
            raise RuntimeError("no gallery is open: call open_gallery(path) first")
        if isinstance(tracklet, np.ndarray) and tracklet.ndim == 1:
            query = tracklet.astype(np.float32)
        else:
            query = self.encode(tracklet, camid)
        wanted = None
        if modality is not None:
            parsed = Modality.parse(modality)
            wanted = parsed.other if cross_modal else parsed
        options = SearchOptions(top_k=top_k, rerank=rerank, min_probability=min_probability,
                                rerank_params=rerank_params or RerankParams())
        if min_probability is not None and self.calibration is None:
            refine_hits(self.gallery, query, [], options, None)  # raises the explanation
        hits = self.gallery.search(query, options.fetch_k, modality=wanted, camids=cameras)[0]
        return refine_hits(self.gallery, query, hits, options, self.calibration)

