"""Score calibration: what similarity means "same person".

Raw similarities are not probabilities, and their scale differs per model and per dataset (a
cosine of 0.6 may be a near-certain match for one checkpoint and noise for another). A
calibration is fitted on labelled cross-modal pairs (``vvireid-train calibrate``): a logistic curve
``p = 1 / (1 + exp(-(slope * score + intercept)))`` with ``slope > 0``, so the probability is
monotone in the score and a ``min_probability`` is the same as a minimum score
(:meth:`Calibration.score_for`).

Why logistic and balanced: a search always compares one query with many gallery items, so the
share of true pairs among all pairs (about 1 / identities) says nothing about the pairs a user
looks at. The fit weighs both classes equally, i.e. the probability assumes even prior odds;
``prior`` re-weights it to another prior at fit time.

It is stored as JSON beside the checkpoint (``<checkpoint>.calibration.json``), tied to the
checkpoint's fingerprint so a calibration of another model is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from vvireid.model.fileio import write_text_atomic

FORMAT = "vvireid.calibration"
SUFFIX = ".calibration.json"
_NEWTON_STEPS = 100


class CalibrationError(ValueError):
    """A calibration cannot be fitted or read; the message names the file or the reason."""


@dataclass(frozen=True)
class Calibration:
    """A monotone map from similarity score to probability of "same identity"."""

    slope: float
    intercept: float
    fingerprint: str | None = None
    similarity: str = "cosine"
    prior: float = 0.5
    stats: dict[str, Any] = field(default_factory=dict)

    def probability(self, scores: Any) -> np.ndarray:
        """P(same identity) of each score (float64, same shape as ``scores``)."""
        z = self.slope * np.asarray(scores, dtype=np.float64) + self.intercept
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic, without overflow warnings

    def score_for(self, probability: float) -> float:
        """The smallest score whose probability is at least ``probability`` (in (0, 1))."""
        if not 0.0 < probability < 1.0:
            raise ValueError(f"min_probability must be in (0, 1), got {probability}")
        return (math.log(probability / (1.0 - probability)) - self.intercept) / self.slope

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "kind": "logistic", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "calibration") -> Calibration:
        """Parse :meth:`to_dict` output; errors name ``where`` and the field."""
        if data.get("format") != FORMAT or data.get("kind") != "logistic":
            raise CalibrationError(f"{where}: not a vvireid logistic calibration")
        try:
            slope, intercept = float(data["slope"]), float(data["intercept"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"{where}: slope/intercept missing or not numbers ({exc})") from None
        if not (math.isfinite(slope) and math.isfinite(intercept)) or slope <= 0:
            raise CalibrationError(f"{where}: slope must be a finite number > 0, got {slope}")
        return cls(slope, intercept, data.get("fingerprint"), str(data.get("similarity", "cosine")),
                   float(data.get("prior", 0.5)), dict(data.get("stats") or {}))

    def save(self, path: str | Path) -> None:
        """Write atomically as pretty JSON."""
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, expected_fingerprint: str | None = None) -> Calibration:
        """Read a calibration file, refusing one fitted for another model.

        Raises:
            CalibrationError: unreadable, malformed, or another model's fingerprint.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CalibrationError(f"{path}: cannot read the calibration ({exc})") from None
        if not isinstance(data, dict):
            raise CalibrationError(f"{path}: expected a JSON object")
        calibration = cls.from_dict(data, str(path))
        if expected_fingerprint and calibration.fingerprint not in (None, expected_fingerprint):
            raise CalibrationError(
                f"{path}: fitted for model {calibration.fingerprint}, not {expected_fingerprint}; "
                f"run `vvireid-train calibrate` with this checkpoint"
            )
        return calibration


def calibration_path(checkpoint: str | Path) -> Path:
    """Where a checkpoint's calibration lives: ``<checkpoint>.calibration.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + SUFFIX)


def find_calibration(checkpoint: str | Path, fingerprint: str | None) -> Calibration | None:
    """The checkpoint's calibration when one was fitted, else None."""
    path = calibration_path(checkpoint)
    return Calibration.load(path, fingerprint) if path.is_file() else None


def fit_logistic(
    positives: Any, negatives: Any, *, prior: float = 0.5, l2: float = 1e-6
) -> tuple[float, float]:
    """(slope, intercept) of a class-weighted logistic regression of label on score.

    Newton's method on the convex weighted log-loss (a tiny ``l2`` keeps separable data finite).
    Each class carries total weight ``prior`` (positives) and ``1 - prior`` (negatives).

    Raises:
        CalibrationError: an empty class, or scores that do not rank positives higher.
    """
    pos = np.asarray(positives, dtype=np.float64).ravel()
    neg = np.asarray(negatives, dtype=np.float64).ravel()
    if not len(pos) or not len(neg):
        raise CalibrationError(
            f"calibration needs same- and different-identity pairs, got {len(pos)} and {len(neg)}"
        )
    if not 0.0 < prior < 1.0:
        raise CalibrationError(f"prior must be in (0, 1), got {prior}")
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    weights = np.concatenate([np.full(len(pos), prior / len(pos)),
                              np.full(len(neg), (1.0 - prior) / len(neg))])
    centre, scale = scores.mean(), max(scores.std(), 1e-12)
    x = np.stack([(scores - centre) / scale, np.ones_like(scores)], axis=1)
    theta = np.zeros(2)
    for _ in range(_NEWTON_STEPS):
        p = 0.5 * (1.0 + np.tanh(0.5 * (x @ theta)))
        grad = x.T @ (weights * (p - labels)) + l2 * np.array([theta[0], 0.0])
        hess = (x * (weights * p * (1 - p))[:, None]).T @ x + l2 * np.diag([1.0, 0.0])
        step = np.linalg.solve(hess + 1e-12 * np.eye(2), grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    slope = theta[0] / scale
    intercept = theta[1] - theta[0] * centre / scale
    if not slope > 0:
        raise CalibrationError(
            f"same-identity pairs do not score higher than different-identity pairs "
            f"(mean {pos.mean():.4f} vs {neg.mean():.4f}); this model cannot be calibrated here"
        )
    return float(slope), float(intercept)


def cross_modal_pair_scores(
    feats: np.ndarray, pids: Any, modalities: Any, similarity: str
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of every visible x infrared pair: (same-identity scores, different-identity scores).

    The score is the one a gallery search returns: the inner product, after L2 normalisation when
    the model ranks by cosine.

    Shape: feats [N, D], pids [N], modalities [N] (0 visible, 1 infrared) -> two 1-D arrays.
    """
    feats = np.asarray(feats, dtype=np.float64)
    if similarity == "cosine":
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    pids, modalities = np.asarray(pids), np.asarray(modalities).astype(int)
    vis, ir = np.flatnonzero(modalities == 0), np.flatnonzero(modalities == 1)
    scores = feats[vis] @ feats[ir].T
    same = pids[vis][:, None] == pids[ir][None, :]
    return scores[same], scores[~same]


def summarise(positives: np.ndarray, negatives: np.ndarray, calibration: Calibration) -> dict:
    """Counts, means and the quality of the split at p = 0.5 (for the JSON and the logs)."""
    threshold = calibration.score_for(0.5)
    return {
        "positives": int(len(positives)),
        "negatives": int(len(negatives)),
        "positive_mean": float(np.mean(positives)),
        "negative_mean": float(np.mean(negatives)),
        "score_at_p50": float(threshold),
        "true_positive_rate_at_p50": float(np.mean(positives >= threshold)),
        "false_positive_rate_at_p50": float(np.mean(negatives >= threshold)),
    }
