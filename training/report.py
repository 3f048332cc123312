"""Evaluation runs and their reports: features -> both directions' metrics -> a JSON summary, a
CMC-curve plot and a rank-list picture (PIL only).

``evaluate_model`` encodes every query and gallery tracklet once with ``model.encode`` on
``TestClipDataset`` clips (the preprocessing the indexer and the server use), ranks with the
model's similarity and scores with ``vvireid.training.evaluation.evaluate`` under the dataset's protocol.
The pictures are drawn with PIL because matplotlib is not a dependency: a plot of two curves and a
grid of thumbnails do not justify one. Everything written here is atomic (temp file, fsync, rename).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader
from vvireid.indexer.encode import tracklet_features
from vvireid.indexer.rerank import RerankParams, rerank_distances
from vvireid.indexer.sources.splits import DIRECTIONS, DatasetSplits
from vvireid.model.base import ReIDModel
from vvireid.model.fileio import write_atomic
from vvireid.model.preprocess import FrameError, FramePreprocessor, PreprocessConfig, load_image
from vvireid.model.types import Tracklet
from vvireid.training.data.video_dataset import TestClipDataset, collate_test
from vvireid.training.distributed import DistInfo, all_gather_objects
from vvireid.training.evaluation import EvalResult, distance_matrix, evaluate

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
CMC_FILE = "cmc.png"
RANKLIST_FILE = "ranklist.png"
_CURVE_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
_GREEN, _RED, _GREY = (0, 170, 0), (220, 0, 0), (128, 128, 128)


@dataclass
class DirectionResult:
    """One direction's metrics plus what a rank list needs (distances and the tracklets).

    ``variants`` holds the metrics of the model's other ``feature_variants`` when asked for
    (test-set model selection by X-ReID's rule); the main feature's are ``result``.
    """

    result: EvalResult
    distmat: np.ndarray
    query: Sequence[Tracklet]
    gallery: Sequence[Tracklet]
    variants: dict[str, EvalResult] = field(default_factory=dict)
    reranked: bool = False  # distmat holds re-ranked distances, not -score


# ---------------------------------------------------------------------------------------------
# running the evaluation


def encode_tracklets(
    model: ReIDModel,
    tracklets: list[Tracklet],
    preprocess: PreprocessConfig,
    *,
    device: torch.device,
    batch_size: int = 32,
    num_workers: int = 0,
    on_bad_frame: str = "fail",
    dist: DistInfo | None = None,
) -> np.ndarray | None:
    """Retrieval features ``[N, D]`` (float32) of ``tracklets``, in fp32 and eval mode.

    Clips of one tracklet (several under ``dense``) are combined by
    ``vvireid.indexer.encode.tracklet_features``, as the indexer does: un-normalised clip features
    averaged, then L2-normalised for a cosine model. With several ranks each encodes a strided share
    and rank 0 receives all features; other ranks get None.
    """
    dist = dist or DistInfo()
    share = list(range(dist.rank, len(tracklets), dist.world_size))
    dataset = TestClipDataset([tracklets[i] for i in share], FramePreprocessor(preprocess),
                              on_bad_frame=on_bad_frame)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_test, pin_memory=device.type == "cuda")
    camids = torch.tensor([tracklets[i].camid for i in share], dtype=torch.int64)
    feats: dict[int, np.ndarray] = {}
    for clips, counts, local in loader:
        clip_camids = camids[local].repeat_interleave(counts)
        out = model.encode(clips.to(device, non_blocking=True), clip_camids.to(device),
                           normalize=False)
        means = tracklet_features(out, counts, model.similarity).numpy()
        for position, row in zip(local.tolist(), means, strict=True):
            feats[share[position]] = row
    gathered = all_gather_objects(dist, feats) if dist.enabled else [feats]
    if not dist.is_main:
        return None
    merged = {k: v for part in gathered for k, v in part.items()}
    return np.stack([merged[i] for i in range(len(tracklets))]).astype(np.float32)


def evaluate_model(
    model: ReIDModel,
    splits: DatasetSplits,
    *,
    device: torch.device,
    test_sampling: str | None = None,
    dense: bool = False,
    batch_size: int = 32,
    num_workers: int = 0,
    max_rank: int = 20,
    on_bad_frame: str = "fail",
    dist: DistInfo | None = None,
    variants: bool = False,
    rerank: RerankParams | None = None,
) -> dict[str, DirectionResult] | None:
    """Both cross-modal directions of ``splits`` under the dataset's protocol (None off rank 0).

    Each distinct tracklet is encoded once (HITSZ-VCM's two directions share their sets). With
    ``variants`` the model's other ``feature_variants`` are scored too, from the same features.
    With ``rerank`` each query's top-``shortlist`` is k-reciprocal re-ranked; the metrics without
    re-ranking are kept as the variant ``no_rerank``.
    """
    rule = "dense" if dense else (test_sampling or splits.test_sampling)
    preprocess = PreprocessConfig(**{**model.preprocess.to_dict(), "test_sampling": rule})
    unique: dict[Tracklet, int] = {}
    for direction in DIRECTIONS:
        for t in [*splits.query.get(direction, []), *splits.gallery.get(direction, [])]:
            unique.setdefault(t, len(unique))
    ordered = list(unique)
    feats = encode_tracklets(model, ordered, preprocess, device=device, batch_size=batch_size,
                             num_workers=num_workers, on_bad_frame=on_bad_frame, dist=dist)
    if feats is None:
        return None
    results = {}
    for direction in DIRECTIONS:
        query, gallery = splits.query.get(direction, []), splits.gallery.get(direction, [])
        if not query or not gallery:
            log.warning("%s: no %s queries or gallery; skipped", splits.name, direction)
            continue
        q = feats[[unique[t] for t in query]]
        g = feats[[unique[t] for t in gallery]]
        dist_qg = distance_matrix(q, g, model.similarity)
        result = evaluate(dist_qg, [t.pid for t in query], [t.pid for t in gallery],
                          [t.camid for t in query], [t.camid for t in gallery],
                          filter_same_camera=splits.filter_same_camera, max_rank=max_rank)
        results[direction] = DirectionResult(result, dist_qg, query, gallery)
        if variants:
            results[direction].variants = _variant_results(model, splits, q, g, query, gallery,
                                                           max_rank)
        if rerank is not None:
            reranked = rerank_distances(q, g, rerank)
            rr_result = evaluate(reranked, [t.pid for t in query], [t.pid for t in gallery],
                                 [t.camid for t in query], [t.camid for t in gallery],
                                 filter_same_camera=splits.filter_same_camera, max_rank=max_rank)
            plain = results[direction]
            plain.variants["no_rerank"] = plain.result
            results[direction] = DirectionResult(rr_result, reranked, query, gallery,
                                                 plain.variants, reranked=True)
    return results


def _variant_results(model: ReIDModel, splits: DatasetSplits, q: np.ndarray, g: np.ndarray,
                     query: Sequence[Tracklet], gallery: Sequence[Tracklet],
                     max_rank: int) -> dict[str, EvalResult]:
    """Metrics of each feature variant but the first (the feature itself, already scored).

    A cosine model's slices are re-normalised by ``distance_matrix``, which equals normalising
    the slice of the un-normalised feature, as the official evaluator does per output.
    """
    out = {}
    for name, parts in list(model.feature_variants.items())[1:]:
        dist_qg = distance_matrix(np.concatenate([q[:, p] for p in parts], axis=1),
                                  np.concatenate([g[:, p] for p in parts], axis=1),
                                  model.similarity)
        out[name] = evaluate(dist_qg, [t.pid for t in query], [t.pid for t in gallery],
                             [t.camid for t in query], [t.camid for t in gallery],
                             filter_same_camera=splits.filter_same_camera, max_rank=max_rank)
    return out


def flat_metrics(results: dict[str, DirectionResult]) -> dict[str, float]:
    """``{"ir_to_vis/R1": 0.53, ...}`` for logs and checkpoint metadata (fractions); feature
    variants, when scored, add ``{"ir_to_vis/f/R1": ..., "ir_to_vis/f/mAP": ...}``."""
    flat = {f"{name}/{k}": v for name, d in results.items() for k, v in d.result.to_dict().items()}
    for name, d in results.items():
        for variant, result in d.variants.items():
            values = result.to_dict()
            flat.update({f"{name}/{variant}/{k}": values[k] for k in ("R1", "mAP")})
    return flat



def metrics_dict(result: EvalResult, num_queries: int, num_gallery: int) -> dict[str, Any]:
    """R1/R5/R10/R20, mAP, mINP in percent (2 decimals, as papers print), plus counts."""
    values = {k: round(100 * v, 2) for k, v in result.to_dict().items()}
    values.update(
        num_queries=num_queries,
        num_valid_queries=result.num_valid_queries,
        num_gallery=num_gallery,
    )
    return values


def protocol_notes(dataset: str, filter_same_camera: bool, test_sampling: str, seq_len: int,
                   similarity: str, dense: bool) -> list[str]:
    """The facts a reader needs to compare these numbers with a paper's."""
    notes = [
        f"dataset {dataset}; both cross-modal directions (ir_to_vis: infrared queries vs visible "
        "gallery; vis_to_ir: the converse)",
        "gallery filter: items with the query's pid and camid removed (HITSZ-VCM rule)"
        if filter_same_camera else "gallery filter: none (BUPTCampus rule)",
        f"frames: {'dense (mean over all consecutive clips)' if dense else test_sampling}, "
        f"T={seq_len}",
        f"similarity: {similarity}; queries without a positive in the gallery are skipped",
        "metrics in percent; mINP is not computed by the official evaluators (AGW definition)",
    ]
    return notes


def build_report(
    directions: dict[str, DirectionResult],
    *,
    dataset: str,
    notes: list[str],
    **extra: Any,
) -> dict[str, Any]:
    """The JSON report: metrics per direction, protocol notes, then ``extra`` (checkpoint, ...)."""
    return {
        "dataset": dataset,
        "directions": {
            name: metrics_dict(d.result, len(d.query), len(d.gallery)) for name, d in directions.items()
        },
        "protocol": notes,
        **extra,
    }


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Atomic, pretty-printed JSON."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    write_atomic(Path(path), lambda tmp: Path(tmp).write_text(text))


def _save_png(image: Image.Image, path: str | Path) -> None:
    write_atomic(Path(path), lambda tmp: image.save(tmp, format="PNG"))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def draw_cmc(curves: dict[str, np.ndarray], path: str | Path, *, title: str = "CMC",
             maps: dict[str, float] | None = None) -> None:
    """Plot CMC curves (rank 1..k on x, matching rate in % on y) as a PNG; ``maps`` (fractions,
    per curve) go into the legend, since R1 alone hides how the other positives rank."""
    width, height, left, right, top, bottom = 640, 420, 64, 24, 40, 56
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(12)
    max_rank = max((len(c) for c in curves.values()), default=1)
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(rank: int, value: float) -> tuple[float, float]:
        x = left + (rank - 1) / max(1, max_rank - 1) * plot_w
        return x, top + (1 - value) * plot_h

    for tick in range(0, 101, 20):
        _, y = xy(1, tick / 100)
        draw.line([(left, y), (left + plot_w, y)], fill=(230, 230, 230))
        draw.text((left - 8, y), f"{tick}", fill="black", font=small, anchor="rm")
    for rank in sorted({1, *range(5, max_rank + 1, 5), max_rank}):
        x, _ = xy(rank, 0)
        draw.line([(x, top + plot_h), (x, top + plot_h + 4)], fill="black")
        draw.text((x, top + plot_h + 6), str(rank), fill="black", font=small, anchor="mt")
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    draw.text((width / 2, 12), title, fill="black", font=font, anchor="mt")
    draw.text((left + plot_w / 2, height - 20), "rank", fill="black", font=small, anchor="mt")
    draw.text((8, top - 22), "matching rate (%)", fill="black", font=small)
    for i, (name, cmc) in enumerate(curves.items()):
        colour = _CURVE_COLOURS[i % len(_CURVE_COLOURS)]
        points = [xy(r + 1, float(v)) for r, v in enumerate(cmc)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        label = f"{name}  R1 {100 * float(cmc[0]):.1f}%"
        if maps and name in maps:
            label += f"  mAP {100 * maps[name]:.1f}%"
        lx, ly = left + plot_w - 260, top + plot_h - 24 - 22 * (len(curves) - 1 - i)
        draw.line([(lx, ly + 7), (lx + 24, ly + 7)], fill=colour, width=3)
        draw.text((lx + 30, ly), label, fill="black", font=small)
    _save_png(image, path)


def _thumbnail(tracklet: Tracklet, size: tuple[int, int]) -> Image.Image:
    """The tracklet's middle frame, resized to ``size`` (W, H); grey if it cannot be read."""
    try:
        return load_image(tracklet.frames[len(tracklet.frames) // 2]).resize(size, Image.BILINEAR)
    except FrameError as exc:
        log.warning("rank list: %s", exc)
        return Image.new("RGB", size, _GREY)


def query_average_precision(d: DirectionResult, qi: int, filter_same_camera: bool) -> float | None:
    """The AP of one query under the protocol's gallery filter (None: no positive left)."""
    keep = _kept_order(d, qi, filter_same_camera)
    hits = np.array([d.gallery[gi].pid == d.query[qi].pid for gi in keep], dtype=bool)
    if not hits.any():
        return None
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def select_queries(d: DirectionResult, how: str, count: int, filter_same_camera: bool,
                   seed: int = 0) -> list[int]:
    """Query positions to show: ``worst``/``best`` by AP, ``random``, or a comma list of query
    tracklet ids. Failures (rank-1 wrong) come first in every choice.

    Raises:
        ValueError: an unknown choice or a query id that is not in this direction.
    """
    aps = {qi: query_average_precision(d, qi, filter_same_camera) for qi in range(len(d.query))}
    valid = [qi for qi, ap in aps.items() if ap is not None]
    if how == "worst":
        picked = sorted(valid, key=lambda qi: (aps[qi], qi))[:count]
    elif how == "best":
        picked = sorted(valid, key=lambda qi: (-aps[qi], qi))[:count]
    elif how == "random":
        rng = np.random.default_rng(seed)
        picked = sorted(rng.choice(valid, size=min(count, len(valid)), replace=False).tolist())
    else:
        wanted = [w.strip() for w in how.split(",") if w.strip()]
        position = {t.tracklet_id: qi for qi, t in enumerate(d.query)}
        unknown = [w for w in wanted if w not in position]
        if unknown or not wanted:
            raise ValueError(f"--vis-queries: {how!r} is not worst, best, random or a comma list "
                             f"of query tracklet ids (unknown: {unknown[:5]})")
        picked = [position[w] for w in wanted]

    def failed(qi: int) -> bool:
        top = _top_gallery(d, qi, 1, filter_same_camera)
        return bool(top) and d.gallery[top[0]].pid != d.query[qi].pid

    return sorted(picked, key=lambda qi: not failed(qi))


def draw_ranklist(
    directions: dict[str, DirectionResult],
    path: str | Path,
    *,
    num_queries: int = 4,
    top_k: int = 8,
    thumb: tuple[int, int] = (48, 96),
    filter_same_camera: bool = False,
    queries: str = "worst",
) -> None:
    """A grid per direction: chosen queries (``select_queries``) and their top-k gallery items.

    Each row names the query (id, pid, camera) and its AP; each gallery tile shows its rank, pid,
    camera and score (re-ranked distance ``d`` after re-ranking), with a green border for a
    correct match and red for a wrong one. Gallery items that the protocol removes (same pid and
    camid, under ``filter_same_camera``) are skipped, as in the metric.
    """
    tw, th = thumb
    pad, border, label_h, caption_h, gap = 6, 3, 18, 30, 16
    rows = [(name, qi) for name, d in directions.items()
            for qi in select_queries(d, queries, num_queries, filter_same_camera)]
    cell_w, cell_h = max(tw + 2 * border, 64) + pad, th + 2 * border + caption_h + pad
    width = pad + (top_k + 1) * cell_w + gap
    height = pad + len(rows) * (cell_h + label_h) + pad
    image = Image.new("RGB", (width, max(height, 40)), "white")
    draw = ImageDraw.Draw(image)
    small = _font(11)
    y = pad
    for name, qi in rows:
        d = directions[name]
        query = d.query[qi]
        ap = query_average_precision(d, qi, filter_same_camera)
        ap_text = "no positive" if ap is None else f"AP {100 * ap:.1f}%"
        draw.text((pad, y), f"{name}  query {query.tracklet_id}  pid {query.pid} cam "
                  f"{query.camid}  {ap_text}", fill="black", font=small)
        y += label_h
        _paste(image, draw, _thumbnail(query, thumb), pad, y, _GREY, border)
        for k, gi in enumerate(_top_gallery(d, qi, top_k, filter_same_camera)):
            item = d.gallery[gi]
            colour = _GREEN if item.pid == query.pid else _RED
            x = pad + gap + (k + 1) * cell_w
            _paste(image, draw, _thumbnail(item, thumb), x, y, colour, border)
            draw.text((x + border + 2, y + border + 1), str(k + 1), fill="white", font=small,
                      stroke_width=2, stroke_fill="black")
            value = d.distmat[qi, gi]
            score = f"d {value:.3f}" if d.reranked else f"s {-value:.3f}"
            below = y + th + 2 * border + 2
            draw.text((x, below), f"p{item.pid} c{item.camid}", fill=colour, font=small)
            draw.text((x, below + 13), score, fill="black", font=small)
        y += cell_h
    _save_png(image, path)


def _paste(image: Image.Image, draw: ImageDraw.ImageDraw, tile: Image.Image, x: int, y: int,
           colour: tuple[int, int, int], border: int) -> None:
    draw.rectangle([x, y, x + tile.width + 2 * border - 1, y + tile.height + 2 * border - 1],
                   fill=colour)
    image.paste(tile, (x + border, y + border))


def _kept_order(d: DirectionResult, qi: int, filter_same_camera: bool) -> list[int]:
    """Gallery positions by increasing distance, without the protocol's removed items."""
    query = d.query[qi]
    return [int(gi) for gi in np.argsort(d.distmat[qi], kind="stable")
            if not (filter_same_camera and d.gallery[int(gi)].pid == query.pid
                    and d.gallery[int(gi)].camid == query.camid)]


def _top_gallery(d: DirectionResult, qi: int, top_k: int, filter_same_camera: bool) -> list[int]:
    return _kept_order(d, qi, filter_same_camera)[:top_k]


def write_eval_outputs(
    out_dir: str | Path,
    report: dict[str, Any],
    directions: dict[str, DirectionResult],
    *,
    filter_same_camera: bool,
    vis_queries: str = "worst",
    num_queries: int = 4,
) -> dict[str, str]:
    """Write ``report.json``, ``cmc.png`` and ``ranklist.png`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": str(out / REPORT_FILE), "cmc": str(out / CMC_FILE),
             "ranklist": str(out / RANKLIST_FILE)}
    write_json(paths["report"], report)
    draw_cmc({name: d.result.cmc for name, d in directions.items()}, paths["cmc"],
             title=f"CMC ({report.get('dataset', '')})",
             maps={name: d.result.mAP for name, d in directions.items()})
    draw_ranklist(directions, paths["ranklist"], filter_same_camera=filter_same_camera,
                  queries=vis_queries, num_queries=num_queries)
    return paths
