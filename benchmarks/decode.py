"""CPU decode cost of one server query (6 JPEG frames at 288x144), and of one indexed tracklet.

Usage::

    python benchmarks/decode.py                # JSON: per-query milliseconds, median of runs
    python benchmarks/decode.py --frames 6 --size 288x144 --iters 300
    python benchmarks/decode.py --prepare      # also the indexer's per-tracklet CPU cost

Reports, on one thread (a request's own worker thread), the median time per query of:
``pil`` (PIL decode to RGB), ``simplejpeg`` (libjpeg-turbo via simplejpeg, when installed),
``load_image`` (``vvireid.model.preprocess.load_image``, what the indexer and the encoder call),
``server_decode`` (the query server's header probe and decode, ``vvireid.server.service``) and
``clips`` (``FramePreprocessor.clips``: decode + bilinear resize + normalisation) and
``pixel_clips`` (decode + resize to uint8, the whole CPU part of a query now that the encode
device normalises). The frames are synthetic camera-like crops (gradients plus noise, 4:2:0
JPEG at quality 90), so the figure is reproducible anywhere. Target (issue 13): <= 3 ms.

``--prepare`` adds what one decode thread of ``vvireid-index`` spends per tracklet (12 frames,
6 sampled, VLD T=6), with and without its thumbnail, on each data path: ``float`` (the former
path: normalised float32 clips made in the thread), ``pixels`` (``decode="cpu"``: uint8 clips,
normalised later on the device) and ``device_read`` (``decode="device"``: the thread only checks
and keeps the JPEG bytes). Each is also timed on 32x16 frames at a 32x16 model size, where the
pixel work vanishes: what is left is interpreter time and per-call overhead, which hold the GIL,
so ``1000 / *_python_ms`` bounds the tracklets/s of any number of decode threads.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("decode")


def synthetic_frames(count: int, height: int, width: int, quality: int = 90) -> list[bytes]:
    """``count`` different JPEG frames that compress like real person crops (not flat colour)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(count):
        base = np.stack([x * 255 / width, y * 255 / height, (x + y + 40 * i) % 256], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
        frames.append(out.getvalue())
    return frames


def median_ms(fn: Callable[[], Any], iters: int) -> float:
    """Median wall time of ``fn`` in milliseconds over ``iters`` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 3)


def measure(frames: int, height: int, width: int, iters: int) -> dict[str, Any]:
    from vvireid.model.config import ModelConfig
    from vvireid.model.preprocess import FramePreprocessor, load_image, simplejpeg

    data = synthetic_frames(frames, height, width)
    result: dict[str, Any] = {
        "frames": frames, "size": f"{height}x{width}", "iters": iters,
        "torch_threads": torch.get_num_threads(), "bytes_per_frame": sum(map(len, data)) // frames,
    }
    result["pil_ms"] = median_ms(
        lambda: [Image.open(io.BytesIO(d)).convert("RGB") for d in data], iters)
    if simplejpeg is not None:
        result["simplejpeg_ms"] = median_ms(
            lambda: [simplejpeg.decode_jpeg(d, colorspace="RGB") for d in data], iters)
    result["load_image_ms"] = median_ms(lambda: [load_image(d) for d in data], iters)
    config = ModelConfig("vld", 10, image_size=(height, width), seq_len=frames)
    preprocessor = FramePreprocessor(config.preprocess)
    result["clips_ms"] = median_ms(lambda: preprocessor.clips(data), iters)
    result["pixel_clips_ms"] = median_ms(lambda: preprocessor.pixel_clips(data), iters)
    server = _server_decode(data, (width, height))
    if server is not None:
        result["server_decode_ms"] = median_ms(server, iters)
    result["target_ms"] = 3.0
    return result


def _server_decode(data: list[bytes], needed: tuple[int, int]) -> Callable[[], Any] | None:
    """The query server's own decode of a request's frames (header probe, then the pixels), or
    None when the server's packages are not installed."""
    try:
        from vvireid.server.service import decode_frame, probe_frame
    except ImportError:
        return None
    limit = 1 << 40

    def run() -> list[Any]:
        return [decode_frame(probe_frame(d, "frames", "frames", limit), "frames", "frames",
                             needed, d) for d in data]

    return run


def measure_prepare(height: int, width: int, iters: int) -> dict[str, Any]:
    """Single-thread milliseconds per tracklet of each data path's worker-side work."""
    result: dict[str, Any] = {"frames_per_tracklet": 12, "seq_len": 6,
                              "size": f"{height}x{width}", "iters": iters}
    result.update(_prepare_costs(height, width, iters, ""))
    result.update(_prepare_costs(32, 16, iters, "_python"))
    result["pixels_vs_float"] = round(result["pixels_ms"] / result["float_ms"], 3)
    result["pixels_vs_float_with_thumbnail"] = round(
        result["pixels_with_thumbnail_ms"] / result["float_with_thumbnail_ms"], 3)
    return result


def _prepare_costs(height: int, width: int, iters: int, label: str) -> dict[str, float]:
    from vvireid.indexer.encode import TrackletEncoder
    from vvireid.model.backbone import TINY_MODEL, register_tiny_configs
    from vvireid.model.config import ModelConfig
    from vvireid.model.factory import create_model
    from vvireid.model.types import Modality, Tracklet

    register_tiny_configs()
    model = create_model(ModelConfig("vld", 10, backbone=TINY_MODEL, image_size=(height, width),
                                     seq_len=6))
    encoder = TrackletEncoder(model, device="cpu", decode="device")
    frames = synthetic_frames(12, height, width)
    tracklet = Tracklet("t", tuple(frames), Modality.VISIBLE, 0)
    paths = {
        "float": (encoder.prepare, encoder.prepare_with_thumbnail),
        "pixels": (encoder.prepare_pixels, encoder.prepare_pixels_with_thumbnail),
    }
    out = {}
    for name, (plain, with_thumbnail) in paths.items():
        out[f"{name}{label}_ms"] = median_ms(lambda f=plain: f(frames), iters)
        out[f"{name}_with_thumbnail{label}_ms"] = median_ms(
            lambda f=with_thumbnail: f(frames), iters)
    out[f"device_read{label}_ms"] = median_ms(
        lambda: encoder._read_for_device(tracklet, True), iters)
    if label:  # the device stage's own thread: its Python per tracklet (64 in a chunk)
        chunk = 64
        out[f"device_stage{label}_ms"] = round(median_ms(
            lambda: encoder._stage_items(
                [encoder._read_for_device(tracklet, True) for _ in range(chunk)]),
            max(3, iters // 20)) / chunk, 4)
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=6, help="frames per query")
    parser.add_argument("--size", default="288x144", help="frame HEIGHTxWIDTH")
    parser.add_argument("--iters", type=int, default=200, help="timed queries per figure")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--prepare", action="store_true",
                        help="also time the indexer's per-tracklet CPU work on each data path")
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(args.threads)
    report = measure(args.frames, height, width, args.iters)
    if args.prepare:
        report["prepare"] = measure_prepare(height, width, args.iters)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
