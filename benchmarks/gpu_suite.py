"""One prepared command for a short GPU slot: every GPU figure of the project in one JSON report.

Usage::

    python benchmarks/gpu_suite.py                 # on a CUDA machine, at most ~8 minutes
    python benchmarks/gpu_suite.py --smoke         # CPU, tiny configs: checks the suite itself runs
    python benchmarks/gpu_suite.py --only encode,decode --out report.json

Sections (each in its own time box; one that fails or lacks a dependency is reported, not fatal):

- ``encode``: tracklets/s of each method (baseline and VLD at T=6, X-ReID at T=10; ViT-B/16 at
  288x144, random weights) in three modes: ``autocast`` (fp32 weights under bf16 autocast),
  ``bf16`` (weights stored in bf16, :class:`~vvireid.model.inference.InferenceModel`) and
  ``bf16_compiled`` (the same under ``torch.compile``, CUDA graphs per batch bucket), plus the
  minimum cosine of each mode's features to fp32 ones on the same clips.
- ``train``: ``benchmarks/train_step.py`` (VLD and X-ReID recipes, bf16) in a subprocess.
- ``decode``: milliseconds to decode a 6-frame 288x144 JPEG query on one CPU thread with PIL,
  simplejpeg and torchvision (whichever are installed), and batched ``decode_jpeg`` on the GPU;
  the indexer's device path (``decode_jpegs`` + ``resize_pixels``: frames/s, and its pixels'
  mean/max difference to the CPU path on frames that need resizing); plus
  ``benchmarks/decode.py``'s figures (``load_image``, the whole CPU preprocessing, and the
  indexer's single-thread CPU cost per tracklet on each data path, ``prepare``).
- ``index``: indexing throughput end to end: :class:`~vvireid.indexer.encode.TrackletEncoder`
  (its defaults: bf16 weights, compiled batch buckets on CUDA, one decode thread per core) over
  in-memory synthetic JPEG tracklets (12 frames each, VLD T=6), thumbnails on and off, for each
  data path: ``decode=cpu`` (threads decode to uint8, the GPU normalises), ``decode=device``
  (nvJPEG decode and resize on the GPU) and ``float`` (the former path: float32 clips made in
  the threads, joined and copied by the model's thread); plus the minimum cosine between the
  ``device`` and ``cpu`` vectors of the same tracklets.
- ``server``: ``benchmarks/load.py`` (VLD ViT-B/16, bf16, eager unless ``--server-compile``; 32
  clients, a 100k gallery) when fastapi and faiss import.

Time boxes: the whole run has ``--budget-s`` (default 450 s). A compiled mode starts only while
``--compile-reserve-s`` is left, a subprocess section gets at most what is left, and a section
that would start past the budget is reported as skipped; so the suite ends within about 8
minutes on one GPU by construction.

Without a GPU (and without ``--smoke``) it prints ``{"skipped": ...}`` and exits 0, so it can sit in
any script. Targets (issue 13): VLD T=6 >= 2,000 tracklets/s and X-ReID T=10 >= 1,200/s encoding,
training VLD >= 400/s and X-ReID >= 250/s, server p50 <= 30 ms.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import json
import logging
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("gpu_suite")
_DEADLINE = [float("inf")]  # monotonic time at which the budget ends (set by main)


def _left() -> float:
    """Seconds of the suite's budget still left."""
    return _DEADLINE[0] - time.perf_counter()

ENCODE_CASES = (("baseline", 6), ("vld", 6), ("xreid", 10))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn: Callable[[], Any], items: int, iters: int, device: torch.device) -> float:
    """Items per second of ``fn`` over ``iters`` timed calls after one untimed call."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return items * iters / (time.perf_counter() - start)


def bench_encode(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    from vvireid.model.backbone import register_tiny_configs
    from vvireid.model.config import ModelConfig
    from vvireid.model.factory import create_model
    from vvireid.model.inference import InferenceModel

    register_tiny_configs()
    size = (64, 32) if args.smoke else (288, 144)
    backbone = "vvireid-tiny" if args.smoke else "ViT-B-16"
    batch, iters = (4, 1) if args.smoke else (args.encode_batch, args.encode_iters)
    results = []
    for method, seq_len in ENCODE_CASES:
        torch.manual_seed(0)
        model = create_model(
            ModelConfig(
                method, 500, backbone=backbone, image_size=size, seq_len=seq_len, num_cameras=6,
            ),
        ).eval()
        clips = torch.randn(batch, seq_len, 3, *size)
        camids = torch.arange(batch) % 6 if method == "xreid" else None
        check = slice(0, min(batch, 8))
        reference = model.to(device).encode(clips[check].to(device),
                                            None if camids is None else camids[check].to(device))
        row: dict[str, Any] = {"method": method, "seq_len": seq_len, "batch": batch}
        dev_clips = clips.to(device)
        dev_cams = None if camids is None else camids.to(device)

        def autocast_encode(m=model, c=dev_clips, k=dev_cams):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return m.encode(c, k)

        row["autocast_per_s"] = round(_rate(autocast_encode, batch, iters, device), 1)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            got = model.encode(clips[check].to(device),
                               None if camids is None else camids[check].to(device))
        row["autocast_cosine_min"] = _cosine(got, reference)
        for mode, compiled in (("bf16", False), ("bf16_compiled", True)):
            if compiled and args.no_compile:
                continue
            if compiled and method not in args.compile_methods.split(","):
                continue
            if compiled and _left() < args.compile_reserve_s:
                row[f"{mode}_skipped"] = f"time box: {_left():.0f} s left"
                continue
            runner = InferenceModel(copy.deepcopy(model), device, dtype=torch.bfloat16,
                                    compile=compiled, buckets=(batch,))
            started = time.perf_counter()
            runner.warm_up(with_camids=camids is not None)
            row[f"{mode}_warmup_s"] = round(time.perf_counter() - started, 1)
            # Clips already on the device, as for autocast: the model's rate; the transfer
            # from host memory is part of the index section's end-to-end figure.
            row[f"{mode}_per_s"] = round(
                _rate(lambda r=runner, c=dev_clips, k=camids: r.encode(c, k), batch, iters,
                      device), 1)
            got = runner.encode(clips[check], None if camids is None else camids[check])
            row[f"{mode}_cosine_min"] = _cosine(got, reference)
            del runner
        results.append(row)
        log.info("encode %s", row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(F.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=1).min().item(), 6)


def bench_decode(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from PIL import Image

    frames = []
    for i in range(6):
        image = Image.new("RGB", (144, 288), (40 * i, 90, 160))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=90)
        frames.append(out.getvalue())
    iters = 3 if args.smoke else 200
    result: dict[str, Any] = {"frames": 6, "size": "288x144"}

    def pil() -> None:
        for data in frames:
            Image.open(io.BytesIO(data)).convert("RGB").load()

    result["pil_ms"] = round(1000 * iters / _rate(pil, iters, iters, torch.device("cpu")), 3)
    if importlib.util.find_spec("simplejpeg"):
        import simplejpeg

        def sj() -> None:
            for data in frames:
                simplejpeg.decode_jpeg(data)

        result["simplejpeg_ms"] = round(1000 * iters / _rate(sj, iters, iters,
                                                              torch.device("cpu")), 3)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from decode import measure, measure_prepare  # benchmarks/decode.py: the repo's own path

    result["query"] = measure(6, 288, 144, iters)
    result["prepare"] = measure_prepare(288, 144, 5 if args.smoke else 100)
    if importlib.util.find_spec("torchvision"):
        from torchvision.io import decode_jpeg

        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in frames]
        result["torchvision_cpu_ms"] = round(
            1000 * iters / _rate(lambda: decode_jpeg(tensors), iters, iters,
                                 torch.device("cpu")), 3)
        if device.type == "cuda":
            batch = tensors * 32  # 32 queries of 6 frames in one call
            rate = _rate(lambda: decode_jpeg(batch, device=device), len(batch), iters, device)
            result["torchvision_gpu_frames_per_s"] = round(rate, 1)
        result["device_path"] = _device_path(args, device)
    return result


def _device_path(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The indexer's device decode (decode_jpegs + resize_pixels) on frames that need resizing
    (320x160 -> 288x144): frames/s, and the pixels' difference to the CPU path's."""
    import numpy as np
    from vvireid.model.config import ModelConfig
    from vvireid.model.preprocess import (
        FramePreprocessor,
        decode_jpegs,
        load_pixels,
        resize_pixels,
    )

    sys.path.insert(0, str(REPO / "benchmarks"))
    from decode import synthetic_frames

    size = (288, 144)
    frames = synthetic_frames(6, 320, 160)
    batch = frames * (2 if args.smoke else 64)
    iters = 1 if args.smoke else 10

    def run() -> torch.Tensor:
        return resize_pixels(decode_jpegs(batch, device), size)

    result: dict[str, Any] = {"source": "320x160", "size": list(size), "batch_frames": len(batch),
                              "frames_per_s": round(_rate(run, len(batch), iters, device), 1)}
    preprocessor = FramePreprocessor(ModelConfig("vld", 5, image_size=size).preprocess)
    expected = np.stack([preprocessor.frame_pixels(load_pixels(f)).transpose(2, 0, 1)
                         for f in frames]).astype(np.int16)
    got = resize_pixels(decode_jpegs(frames, device), size).cpu().numpy().astype(np.int16)
    diff = np.abs(got - expected)
    result["vs_cpu_path_mean_abs"] = round(float(diff.mean()), 4)
    result["vs_cpu_path_max_abs"] = int(diff.max())
    same = synthetic_frames(6, *size)  # no resize: the decoders alone
    got = resize_pixels(decode_jpegs(same, device), size).cpu().numpy().astype(np.int16)
    expected = np.stack([load_pixels(f).transpose(2, 0, 1) for f in same]).astype(np.int16)
    result["decode_only_vs_cpu_max_abs"] = int(np.abs(got - expected).max())
    return result


def bench_index(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Tracklets/s of ``TrackletEncoder.encode_tracklets`` over synthetic in-memory JPEGs."""
    import os

    from vvireid.indexer.encode import TrackletEncoder, resolve_decode
    from vvireid.model.backbone import register_tiny_configs
    from vvireid.model.config import ModelConfig
    from vvireid.model.factory import create_model
    from vvireid.model.types import Modality, Tracklet

    sys.path.insert(0, str(REPO / "benchmarks"))
    from decode import synthetic_frames

    register_tiny_configs()
    size = (64, 32) if args.smoke else (288, 144)
    count = 8 if args.smoke else args.index_tracklets
    frames = synthetic_frames(12, *size)  # 12 distinct frames, shared by every tracklet
    tracklets = [
        Tracklet(f"t{i:06d}", tuple(frames), Modality.VISIBLE if i % 2 else Modality.INFRARED,
                 i % 6)
        for i in range(count)
    ]
    torch.manual_seed(0)
    model = create_model(ModelConfig(
        "vld", 500, backbone="vvireid-tiny" if args.smoke else "ViT-B-16", image_size=size,
        seq_len=6, num_cameras=6,
    ))
    workers = os.cpu_count() or 4
    encoder = TrackletEncoder(
        model, device=str(device), batch_size=4 if args.smoke else args.encode_batch,
        num_workers=workers, buckets=(4,) if args.smoke else (args.encode_batch,),
        compile=False if args.no_compile or _left() < args.compile_reserve_s else None,
    )
    result: dict[str, Any] = {
        "tracklets": count, "frames_per_tracklet": 12, "seq_len": 6, "size": list(size),
        "decode_threads": workers, "dtype": str(encoder.dtype).replace("torch.", ""),
        "compiled": encoder.runner.compiled, "buckets": list(encoder.runner.buckets),
        "auto_decode": encoder.decode, "warmup_s": round(encoder.warm_up(), 1),
    }
    vectors: dict[str, Any] = {}
    for path in ("cpu", "device", "float"):
        try:
            _index_path(encoder, path, resolve_decode)
        except ValueError as exc:  # decode=device without torchvision's decoder
            result[f"{path}_skipped"] = str(exc)
            continue
        list(encoder.encode_tracklets(tracklets[: 2 * encoder.batch_size * 4]))  # warm: pools, nvJPEG
        for thumbnails in (True, False):
            started = time.perf_counter()
            chunks = list(encoder.encode_tracklets(tracklets, thumbnails=thumbnails))
            _sync(device)
            rate = sum(len(c.tracklets) for c in chunks) / (time.perf_counter() - started)
            key = "with_thumbnails" if thumbnails else "without_thumbnails"
            result[f"{path}_{key}_per_s"] = round(rate, 1)
            vectors[path] = torch.cat([torch.from_numpy(c.vectors) for c in chunks])
    if "device" in vectors and "cpu" in vectors:
        result["device_vs_cpu_cosine_min"] = _cosine(vectors["device"], vectors["cpu"])
    if "float" in vectors and "cpu" in vectors:
        result["float_vs_cpu_cosine_min"] = _cosine(vectors["float"], vectors["cpu"])
    encoder.close()
    result["target_per_s"] = 1500
    return result


def _index_path(encoder: Any, path: str, resolve_decode: Callable[..., str]) -> None:
    """Point ``encoder`` at one data path; ``float`` restores the former one (threads make
    normalised float32 clips; the model's thread joins them and copies them per bucket)."""
    for name in ("_prepare_on_cpu", "_stage_items"):
        encoder.__dict__.pop(name, None)
    if path != "float":
        encoder.decode = resolve_decode(path, encoder.device)
        return
    encoder.decode = "cpu"

    def prepare_float(frames: Any, thumbnails: bool) -> Any:
        if thumbnails:
            return encoder.prepare_with_thumbnail(frames)
        return encoder.prepare(frames), None

    encoder._prepare_on_cpu = prepare_float
    encoder._stage_items = lambda loaded, pool=None: loaded


def bench_profile(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Where one VLD training step's time goes: torch.profiler over a few steps of the recipe.

    Reports the step time, the share of the identity prompts through the frozen text tower
    (forward and backward, timed on their own, at the EOT cut and at all 77 positions), and
    the operators with the most self time (device time on CUDA, CPU time otherwise).
    """
    from torch.profiler import ProfilerActivity, profile
    from vvireid.model.backbone import register_tiny_configs
    from vvireid.model.config import ModelConfig
    from vvireid.model.factory import create_model
    from vvireid.training.config import load_config
    from vvireid.training.objectives import create_objective
    from vvireid.training.optim import create_optimizer, create_scheduler, is_fused

    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_step import RECIPES, make_train_step, synthetic_batch

    register_tiny_configs()
    config = load_config(RECIPES["vld"], ["model.pretrained=null"])
    m, data = config.model, config.data
    size = (64, 32) if args.smoke else tuple(m.image_size)
    classes = 500
    model = create_model(ModelConfig(
        m.method, classes, backbone="vvireid-tiny" if args.smoke else m.backbone,
        image_size=size, seq_len=m.seq_len, options=m.options,
    )).to(device)
    objective = create_objective(m.method, model, config.loss)
    optimizer = create_optimizer(model, config.optim)
    create_scheduler(optimizer, config.optim).set_epoch(5)
    batch = synthetic_batch(data.ids_per_batch, data.tracklets_per_id, m.seq_len, size, classes,
                            6, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    step = make_train_step(model, objective, optimizer, batch, device,
                           torch.bfloat16 if device.type == "cuda" else None)

    def prompts(full: bool) -> None:
        text, cut = model.backbone.text, model.prompts
        with amp:
            if full:
                eot = torch.full((cut.num_classes,), cut.eot_index, device=device)
                feats = text.encode_embeddings(cut.embeddings(text), eot)
            else:
                feats = cut(text)
        feats.float().square().sum().backward()

    model.train()
    steps = 1 if args.smoke else 5
    result: dict[str, Any] = {
        "recipe": RECIPES["vld"], "batch_tracklets": batch.clips.shape[0], "classes": classes,
        "fused_optimizer": is_fused(optimizer), "size": list(size),
        "step_s": round(steps / _rate(step, steps, steps, device), 4),
        "prompts_eot_cut_s": round(steps / _rate(lambda: prompts(False), steps, steps, device), 4),
        "prompts_77_tokens_s": round(steps / _rate(lambda: prompts(True), steps, steps, device), 4),
    }
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    if device.type == "cuda":  # kernels only: operator rows repeat their kernels' device time
        from torch.autograd import DeviceType

        events = [e for e in events if e.device_type == DeviceType.CUDA]
    total = sum(getattr(e, key) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:15]
    result["top_ops"] = [
        {"op": e.key, "ms_per_step": round(getattr(e, key) / 1000 / steps, 3),
         "share": round(getattr(e, key) / total, 3), "calls_per_step": e.count // steps}
        for e in top
    ]
    result["profiled_ms_per_step"] = round(total / 1000 / steps, 2)
    return result


def run_subprocess(command: list[str], timeout: float) -> dict[str, Any]:
    """Run a benchmark script that prints JSON; return its last JSON object or the failure."""
    timeout = max(1.0, min(timeout, _left()))
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "command": " ".join(command)}
    out = proc.stdout
    start = out.find("{")
    if proc.returncode != 0 or start < 0:
        return {"error": f"exit {proc.returncode}", "command": " ".join(command),
                "stderr_tail": proc.stderr[-2000:]}
    try:
        report = json.loads(out[start:])
    except json.JSONDecodeError:
        return {"error": "output is not JSON", "stdout_tail": out[-2000:]}
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


def bench_train(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    command = [sys.executable, "benchmarks/train_step.py", "--method", "both",
               "--device", str(device), "--precision", "bf16" if device.type == "cuda" else "fp32"]
    if args.smoke:
        command += ["--iters", "1", "--warmup", "0", "--batch-ids", "2", "--num-classes", "16",
                    "--data-batches", "0", "--skip-compute"]
    else:
        command += ["--iters", "20", "--warmup", "3", "--data-batches", "4"]
    return run_subprocess(command, timeout=args.section_timeout)


def bench_server(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    missing = [m for m in ("fastapi", "faiss", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"missing {', '.join(missing)}"}
    command = [sys.executable, "benchmarks/load.py", "--device", str(device)]
    if args.smoke:
        command += ["--gallery", "200", "--clients", "2", "--requests", "2", "--size", "64x32"]
    else:
        # The setting: a VLD ViT-B/16 (random weights cost what trained ones do), a 100k
        # gallery, 32 clients. Compiling every batch bucket at start costs minutes, so the
        # server runs eager bf16 unless --server-compile.
        command += ["--gallery", "100000", "--clients", "32", "--requests", "20",
                    "--method", "vld", "--backbone", "ViT-B-16", "--max-batch", "32",
                    "--compile" if args.server_compile else "--no-compile"]
    return run_subprocess(command, timeout=args.section_timeout)


SECTIONS: dict[str, Callable[[argparse.Namespace, torch.device], Any]] = {
    "encode": bench_encode,
    "decode": bench_decode,
    "index": bench_index,
    "profile": bench_profile,
    "train": bench_train,
    "server": bench_server,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections (default: all of {', '.join(SECTIONS)})")
    parser.add_argument("--smoke", action="store_true",
                        help="run tiny configs on the CPU to check the suite itself")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile mode")
    parser.add_argument("--encode-batch", type=int, default=64, help="tracklets per encode call")
    parser.add_argument("--encode-iters", type=int, default=10, help="timed encode calls")
    parser.add_argument("--server-compile", action="store_true",
                        help="server section: start the server with --compile (minutes of warm-up)")
    parser.add_argument("--section-timeout", type=float, default=180.0,
                        help="seconds allowed to each subprocess section")
    parser.add_argument("--compile-methods", default="vld,xreid",
                        help="methods whose compiled mode the encode section measures")
    parser.add_argument("--index-tracklets", type=int, default=3000,
                        help="synthetic tracklets in the index section")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="the whole suite's time box in seconds")
    parser.add_argument("--compile-reserve-s", type=float, default=150.0,
                        help="a compiled mode starts only while this much budget is left")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; "
                     f"known: {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print(json.dumps({"skipped": "no CUDA device visible to torch; nothing measured"}))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "smoke": args.smoke,
    }
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    _DEADLINE[0] = started + args.budget_s
    for name in args.only.split(","):
        if _left() <= 0:
            report[name] = {"skipped": f"time box: the {args.budget_s:.0f} s budget is spent"}
            continue
        t0 = time.perf_counter()
        try:
            report[name] = SECTIONS[name](args, device)
        except Exception as exc:  # one broken section must not lose the others' figures
            log.exception("section %s failed", name)
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        log.info("section %s took %.1f s", name, time.perf_counter() - t0)
    report["total_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
