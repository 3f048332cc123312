"""``vvireid-train calibrate``: fit what score means "same person" for one checkpoint.

Encodes a labelled split (the preprocessing of evaluation, the indexer and the server), scores
every visible x infrared pair, fits :class:`~vvireid.indexer.calibration.Calibration` and stores
it beside the checkpoint (``<checkpoint>.calibration.json``), where ``vvireid-serve`` and
``ReID.load`` find it. A PNG of the two score histograms with the fitted curve shows how well the
model separates the identities (overlap = the errors no threshold can avoid).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from vvireid.indexer.calibration import (
    Calibration,
    calibration_path,
    cross_modal_pair_scores,
    fit_logistic,
    summarise,
)
from vvireid.indexer.sources import load_dataset
from vvireid.indexer.sources.splits import DatasetSplits
from vvireid.model.checkpoint import load_checkpoint
from vvireid.model.fileio import write_atomic
from vvireid.model.types import Tracklet
from vvireid.training.report import _font, encode_tracklets

log = logging.getLogger(__name__)

HISTOGRAM_SUFFIX = ".calibration.png"
_POS, _NEG, _CURVE = (44, 160, 44), (214, 39, 40), (31, 119, 180)


def split_tracklets(splits: DatasetSplits, split: str) -> list[Tracklet]:
    """The labelled tracklets to pair: ``test`` (queries + galleries, deduplicated) or ``train``."""
    if split == "train":
        return list(splits.train)
    if split != "test":
        raise ValueError(f"unknown split {split!r}; use test or train")
    unique: dict[Tracklet, None] = {}
    for part in (splits.query, splits.gallery):
        for tracklets in part.values():
            unique.update(dict.fromkeys(tracklets))
    return list(unique)


def calibrate_checkpoint(
    checkpoint: str | Path,
    data_root: str | Path,
    fmt: str,
    *,
    split: str = "test",
    device: torch.device | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    prior: float = 0.5,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Fit and store the calibration of ``checkpoint`` on a dataset split; returns a summary.

    Raises:
        CalibrationError: the split lacks same- or different-identity cross-modal pairs, or the
            model does not score same-identity pairs higher.
    """
    checkpoint = Path(checkpoint)
    device = device or torch.device("cpu")
    model = load_checkpoint(checkpoint, map_location=device)
    tracklets = split_tracklets(load_dataset(fmt, data_root), split)
    log.info("calibrating %s on %d %s tracklets of %s", checkpoint, len(tracklets), split, fmt)
    feats = encode_tracklets(model, tracklets, model.preprocess, device=device,
                             batch_size=batch_size, num_workers=num_workers)
    positives, negatives = cross_modal_pair_scores(
        feats, [t.pid for t in tracklets], [int(t.modality) for t in tracklets], model.similarity
    )
    slope, intercept = fit_logistic(positives, negatives, prior=prior)
    calibration = Calibration(slope, intercept, model.fingerprint, model.similarity, prior)
    stats = {**summarise(positives, negatives, calibration), "dataset": fmt, "split": split}
    calibration = Calibration(slope, intercept, model.fingerprint, model.similarity, prior, stats)
    target = Path(out) if out else calibration_path(checkpoint)
    calibration.save(target)
    picture = target.with_name(target.name.removesuffix(".json") + ".png")
    draw_score_histograms(positives, negatives, calibration, picture)
    log.info("calibration: p=0.5 at score %.4f; written to %s", stats["score_at_p50"], target)
    return {"calibration": str(target), "histogram": str(picture), "slope": slope,
            "intercept": intercept, **stats}


def draw_score_histograms(
    positives: np.ndarray,
    negatives: np.ndarray,
    calibration: Calibration,
    path: str | Path,
    *,
    bins: int = 40,
) -> None:
    """Both score distributions (each normalised to its own peak) and the fitted probability."""
    width, height, left, right, top, bottom = 640, 420, 56, 24, 40, 56
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(12)
    lo = float(min(positives.min(), negatives.min()))
    hi = float(max(positives.max(), negatives.max()))
    hi = hi if hi > lo else lo + 1e-6
    edges = np.linspace(lo, hi, bins + 1)
    plot_w, plot_h = width - left - right, height - top - bottom
    bar_w = plot_w / bins
    for values, colour, shift in ((negatives, _NEG, 0.0), (positives, _POS, 0.5)):
        counts, _ = np.histogram(values, edges)
        peak = max(int(counts.max()), 1)
        for b, count in enumerate(counts):
            x0 = left + b * bar_w + shift * bar_w
            y0 = top + plot_h * (1 - count / peak)
            draw.rectangle([x0, y0, x0 + bar_w / 2, top + plot_h], fill=colour)
    xs = np.linspace(lo, hi, 200)
    curve = [(left + (x - lo) / (hi - lo) * plot_w, top + plot_h * (1 - p))
             for x, p in zip(xs, calibration.probability(xs), strict=True)]
    draw.line(curve, fill=_CURVE, width=3)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    for value in np.linspace(lo, hi, 6):
        x = left + (value - lo) / (hi - lo) * plot_w
        draw.text((x, top + plot_h + 6), f"{value:.2f}", fill="black", font=small, anchor="mt")
    draw.text((width / 2, 12), "cross-modal pair scores (each histogram scaled to its peak)", fill="black", font=font, anchor="mt")
    draw.text((left + plot_w / 2, height - 20), "score", fill="black", font=small, anchor="mt")
    legend = [(_POS, f"same identity (n={len(positives)})"),
              (_NEG, f"different identity (n={len(negatives)})"),
              (_CURVE, "P(same): 0 at the bottom, 1 at the top")]
    for i, (colour, text) in enumerate(legend):
        draw.rectangle([left + 8, top + 8 + 18 * i, left + 20, top + 20 + 18 * i], fill=colour)
        draw.text((left + 26, top + 8 + 18 * i), text, fill="black", font=small)
    write_atomic(Path(path), lambda tmp: image.save(tmp, format="PNG"))
