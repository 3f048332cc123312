"""CPU decode cost of one server query: 6 JPEG frames at 288x144, decoded and preprocessed.

Usage::

    python benchmarks/decode.py                # JSON: per-query milliseconds, median of runs
    python benchmarks/decode.py --frames 6 --size 288x144 --iters 300

Reports, on one thread (a request's own worker thread), the median time per query of:
``pil`` (PIL decode to RGB), ``simplejpeg`` (libjpeg-turbo via simplejpeg, when installed),
``load_image`` (``vvireid.model.preprocess.load_image``, what the indexer and the encoder call)
and ``clips`` (``FramePreprocessor.clips``: decode + bilinear resize + normalisation, the whole
CPU part of a query). The frames are synthetic camera-like crops (gradients plus noise, 4:2:0
JPEG at quality 90), so the figure is reproducible anywhere. Target (issue 13): <= 3 ms.
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
    result["target_ms"] = 3.0
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=6, help="frames per query")
    parser.add_argument("--size", default="288x144", help="frame HEIGHTxWIDTH")
    parser.add_argument("--iters", type=int, default=200, help="timed queries per figure")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.frames, height, width, args.iters), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
