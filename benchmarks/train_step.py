"""Training throughput of the full-size recipes: data loading and compute measured separately.

Usage::

    python benchmarks/train_step.py --method vld --device cuda --precision bf16 --iters 20
    python benchmarks/train_step.py --method both --device cpu --precision fp32 --iters 1 \\
        --warmup 0 --batch-ids 2 --num-classes 16 --data-batches 2

Compute: the recipe's model (ViT-B/16 at 288x144, random init: weights do not change the cost),
objective, optimiser groups and precision; in-memory random clips of the recipe's batch
(``--batch-ids`` shrinks it; at least 2, since the batch losses need two identities); timed over ``--iters`` steps of forward + loss + backward +
objective hook + optimiser step, after ``--warmup`` untimed steps. ``--num-classes`` sets the
identity count (500 = HITSZ-VCM's training ids; VLD's text prompts run once per class per step).

Data: a small synthetic HITSZ-VCM (288x144 JPEG frames) is written to a temporary folder, then
``--data-batches`` batches are drawn through the real sampler, ``TrainClipDataset`` (decode +
frame sampling) and the recipe's augmentation in this process (one worker's cost), once per
place the augmentation can run (``data.augment_on``): ``worker`` (float clips built in the
worker, as before the split) and ``device`` (the worker's CPU part: uint8 pixels and plans).
Each reports the worker's build time (items + collate), the shared-memory hand-off of the
collated batch to the main process (what a worker's queue does with it), and tracklets per
second per worker with and without that hand-off. For ``device``, ``device_part_ms_per_batch``
times ``transform.apply`` on ``--device`` for one collated batch (the trainer's cost per step).
``--data-workers N`` also times a real DataLoader with N worker processes (after its first batch).
``--data-profile`` prints the per-frame cost of each stage instead (decode, resize, crop/flip,
normalise, erasing and channel ops on the CPU, assembly and hand-off of float vs uint8 clips).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing  # noqa: F401 - registers the tensor reductions ForkingPickler uses
from vvireid.indexer.sources import load_dataset
from vvireid.model.config import ModelConfig
from vvireid.model.factory import create_model
from vvireid.model.preprocess import load_image, load_pixels
from vvireid.model.types import Modality
from vvireid.training.config import load_config
from vvireid.training.data.samplers import CrossModalityIdentitySampler
from vvireid.training.data.synth import synthesize
from vvireid.training.data.transforms import (
    AugmentPlan,
    VLDTransform,
    apply_plan,
    build_train_transform,
)
from vvireid.training.data.video_dataset import TrainClipDataset
from vvireid.training.objectives import TrainBatch, create_objective
from vvireid.training.optim import create_optimizer, create_scheduler
from vvireid.training.trainer import autocast_dtype, to_train_batch

RECIPES = {"vld": "vld_hitsz_vcm", "xreid": "xreid_hitsz_vcm"}


def synthetic_batch(ids: int, per_id: int, seq_len: int, size: tuple[int, int],
                    num_classes: int, num_cameras: int, device: torch.device) -> TrainBatch:
    """Random clips in the TrainBatch layout: visible clips, then the aligned infrared clips."""
    half = ids * per_id
    pids = torch.arange(ids).repeat_interleave(per_id) % num_classes
    clips = torch.randn(2 * half, seq_len, 3, *size)
    camids = torch.randint(0, num_cameras, (2 * half,))
    modalities = torch.cat([torch.full((half,), int(Modality.VISIBLE)),
                            torch.full((half,), int(Modality.INFRARED))])
    return TrainBatch(clips, torch.cat([pids, pids]), camids, modalities).to(device)


def make_train_step(model, objective, optimizer, batch: TrainBatch, device: torch.device,
                    dtype: torch.dtype | None) -> Callable[[], torch.Tensor]:
    """One optimiser step of the recipe (forward, loss, backward, objective hook, update) as the
    trainer runs it; autocast to ``dtype`` unless None. Returns the loss without reading it back
    (a host sync per step would be timed too)."""

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(batch.clips, batch.camids)
            terms = objective(out, batch)
        loss = torch.stack([t.float() for t in terms.values()]).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        objective.after_backward(out, batch)
        optimizer.step()
        return loss.detach()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_compute(method: str, args: argparse.Namespace, device: torch.device) -> dict:
    config = load_config(RECIPES[method], ["model.pretrained=null"])
    m, data = config.model, config.data
    ids = max(2, args.batch_ids or data.ids_per_batch)  # batch losses need two identities
    model = create_model(
        ModelConfig(
            m.method, args.num_classes, backbone=m.backbone, image_size=tuple(m.image_size),
            seq_len=m.seq_len, num_cameras=args.num_cameras, options=m.options,
        ),
    ).to(device)
    objective = create_objective(m.method, model, config.loss)
    state = objective.state_dict()
    if state:  # prototype memories: unit rows instead of an epoch pass over a dataset
        memories = {k: torch.nn.functional.normalize(torch.randn_like(v), dim=1)
                    for k, v in state.items() if isinstance(v, torch.Tensor)}
        objective.load_state_dict({**state, **memories, "memories_ready": True})
    optimizer = create_optimizer(model, config.optim)
    create_scheduler(optimizer, config.optim).set_epoch(5)
    batch = synthetic_batch(ids, data.tracklets_per_id, m.seq_len, tuple(m.image_size),
                            args.num_classes, args.num_cameras, device)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[args.precision]
    if args.precision == "auto":
        dtype = autocast_dtype("auto", device)

    step = make_train_step(model, objective, optimizer, batch, device, dtype)

    model.train()
    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / args.iters
    tracklets = batch.clips.shape[0]
    result = {
        "method": method, "recipe": RECIPES[method], "precision": args.precision,
        "batch_tracklets": tracklets, "frames_per_step": tracklets * m.seq_len,
        "image_size": list(m.image_size), "num_classes": args.num_classes,
        "step_seconds": round(seconds, 4), "tracklets_per_s": round(tracklets / seconds, 2),
        "frames_per_s": round(tracklets * m.seq_len / seconds, 1),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def _handoff(batch: Any) -> None:
    """What a DataLoader worker's queue does with a collated batch: tensors into shared memory."""
    ForkingPickler.dumps(batch)


def _data_setup(method: str, args: argparse.Namespace, root: Path, augment_on: str):
    config = load_config(RECIPES[method], ["model.pretrained=null"])
    m, data = config.model, config.data
    splits = load_dataset("hitsz-vcm", root)
    ids = min(max(2, args.batch_ids or data.ids_per_batch), splits.num_train_pids)
    sampler = CrossModalityIdentitySampler.from_splits(
        splits, ids, data.tracklets_per_id, args.data_batches, seed=0)
    transform = build_train_transform(config.augment, tuple(m.image_size))
    dataset = TrainClipDataset(splits.train, transform, seq_len=m.seq_len,
                               sampling=data.train_sampling, seed=0, augment_on=augment_on)
    return config, sampler, dataset


def _loader_rate(dataset: TrainClipDataset, sampler: Any, workers: int) -> float | None:
    """Tracklets/s per worker of a real DataLoader, timed from its first batch to its last."""
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
    tracklets, start = 0, None
    for items in loader:
        if start is None:
            start = time.perf_counter()
            continue
        tracklets += 2 * items["rgb"].shape[0]
    if start is None or tracklets == 0:
        return None
    return tracklets / (time.perf_counter() - start) / workers


def bench_data_mode(method: str, args: argparse.Namespace, root: Path, augment_on: str,
                    device: torch.device) -> dict:
    """One worker's cost for ``augment_on`` (module docstring), and the device part's per batch."""
    config, sampler, dataset = _data_setup(method, args, root, augment_on)
    collate = torch.utils.data.default_collate
    build = handoff = 0.0
    tracklets = 0
    batches = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker (torch's default there)
    dataset[next(iter(sampler))[0]]  # warm-up, untimed
    for keys in sampler:
        start = time.perf_counter()
        items = collate([dataset[k] for k in keys])
        middle = time.perf_counter()
        _handoff(items)
        build, handoff = build + middle - start, handoff + time.perf_counter() - middle
        tracklets += 2 * items["rgb"].shape[0]
        batches.append(items)
    torch.set_num_threads(threads)
    seq_len = config.model.seq_len
    result = {
        "method": method, "augment": config.augment, "augment_on": augment_on,
        "batches": args.data_batches, "tracklets": tracklets, "frames": tracklets * seq_len,
        "build_s_per_batch": round(build / args.data_batches, 4),
        "handoff_s_per_batch": round(handoff / args.data_batches, 4),
        "tracklets_per_s_per_worker": round(tracklets / build, 2),
        "tracklets_per_s_per_worker_with_handoff": round(tracklets / (build + handoff), 2),
        "ms_per_frame": round(1000 * build / (tracklets * seq_len), 3),
    }
    if augment_on == "device":
        result.update(_device_part_cost(dataset.transform, batches[0], device))
    if args.data_workers:
        rate = _loader_rate(dataset, sampler, args.data_workers)
        result[f"dataloader_{args.data_workers}_workers_tracklets_per_s_per_worker"] = (
            None if rate is None else round(rate, 2))
    return result


def _seconds_per_call(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Mean seconds of ``fn`` over ``reps`` calls after one untimed warm-up call (allocator,
    kernels), synchronised with ``device`` on both sides."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / reps


def _device_part_cost(transform: Any, items: dict, device: torch.device, reps: int = 5) -> dict:
    """The trainer's per-step finishing cost: copy a collated uint8 batch, apply the plans."""
    with_copy = _seconds_per_call(lambda: to_train_batch(items, device, transform), device, reps)
    pixels = torch.cat([items["rgb"], items["ir"]]).to(device)
    plan = AugmentPlan.cat([items["rgb_plan"], items["ir_plan"]]).to(device)
    apply_only = _seconds_per_call(lambda: transform.apply(pixels, plan), device, reps)
    return {"device_part_device": str(device), "device_part_batch": [*pixels.shape[:-3], 3, *pixels.shape[-3:-1]],
            "device_part_ms_per_batch": round(1000 * apply_only, 3),
            "copy_and_device_part_ms_per_batch": round(1000 * with_copy, 3)}


def bench_data(method: str, args: argparse.Namespace, root: Path, device: torch.device) -> list:
    """Both places the augmentation can run, device first; ``ratio`` compares their workers."""
    new = bench_data_mode(method, args, root, "device", device)
    old = bench_data_mode(method, args, root, "worker", device)
    for key in ("tracklets_per_s_per_worker", "tracklets_per_s_per_worker_with_handoff"):
        new[f"{key}_ratio_device_over_worker"] = round(new[key] / old[key], 2)
    return [new, old]


def _per_frame_ms(action: Callable[[], Any], frames: int, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return round(1000 * best / frames, 4)


def profile_data(method: str, root: Path) -> dict:
    """Per-frame cost (ms) of each stage of a recipe's augmentation, both placements."""
    config = load_config(RECIPES[method], ["model.pretrained=null"])
    m = config.model
    transform = build_train_transform(config.augment, tuple(m.image_size))
    splits = load_dataset("hitsz-vcm", root)
    seq_len = m.seq_len
    clips = [t.frames[:seq_len] for t in splits.train if len(t) >= seq_len][:16]
    paths = [p for clip in clips for p in clip]
    frames = len(paths)
    data = [Path(p).read_bytes() for p in paths]
    images = [load_pixels(d) for d in data]  # what TrainClipDataset's workers decode to
    resized = [transform._resize(i) for i in images]
    rng = np.random.default_rng(0)
    torch.set_num_threads(1)  # as in a DataLoader worker
    modalities = [Modality.VISIBLE if i % 2 else Modality.INFRARED for i in range(len(clips))]
    out = {"method": method, "augment": config.augment, "frames": frames,
           "decode_ms": _per_frame_ms(lambda: [load_pixels(d) for d in data], frames),
           "decode_via_pil_ms": _per_frame_ms(lambda: [np.asarray(load_image(d)) for d in data],
                                              frames),
           "resize_ms": _per_frame_ms(lambda: [transform._resize(i) for i in images], frames)}
    if isinstance(transform, VLDTransform):
        canvas = np.zeros((frames, *m.image_size, 3), dtype=np.uint8)
        out["pad_crop_flip_uint8_ms"] = _per_frame_ms(
            lambda: [transform._crop_flip(a, rng, canvas[i]) for i, a in enumerate(resized)], frames)
    else:
        out["flip_copy_uint8_ms"] = _per_frame_ms(
            lambda: [np.ascontiguousarray(a[:, ::-1]) for a in resized], frames)
    groups = [images[i * seq_len:(i + 1) * seq_len] for i in range(len(clips))]
    cpu_parts = [transform.plan(g, mod, rng) for g, mod in zip(groups, modalities, strict=True)]
    out["cpu_part_total_ms"] = _per_frame_ms(
        lambda: [transform.plan(g, mod, rng) for g, mod in zip(groups, modalities, strict=True)],
        frames)
    pixels = torch.stack([p for p, _ in cpu_parts])
    plan = AugmentPlan(*(torch.stack(x) for x in zip(*(q for _, q in cpu_parts), strict=True)))
    empty = AugmentPlan.empty(seq_len)
    # per clip, as augment_on=worker runs it in a DataLoader worker
    out["normalise_ms_cpu"] = _per_frame_ms(
        lambda: [apply_plan(p, empty, transform.mean, transform.std) for p, _ in cpu_parts], frames)
    out["normalise_erase_channel_ops_ms_cpu"] = _per_frame_ms(
        lambda: [transform.apply(p, q) for p, q in cpu_parts], frames)
    floats = transform.apply(pixels, plan)
    out["assemble_float_ms"] = _per_frame_ms(lambda: torch.stack(list(floats)), frames)
    out["assemble_uint8_ms"] = _per_frame_ms(lambda: torch.stack(list(pixels)), frames)
    out["handoff_float_ms"] = _per_frame_ms(lambda: _handoff(floats.clone()), frames)
    out["handoff_uint8_ms"] = _per_frame_ms(lambda: _handoff(pixels.clone()), frames)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("vld", "xreid", "both"), default="both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("bf16", "fp32", "auto"), default="auto")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-ids", type=int, default=0, help="identities per batch (0: recipe)")
    parser.add_argument("--num-classes", type=int, default=500, help="identities of the classifier")
    parser.add_argument("--num-cameras", type=int, default=12)
    parser.add_argument("--data-batches", type=int, default=4, help="0 skips the data timing")
    parser.add_argument("--data-workers", type=int, default=0,
                        help="also time a real DataLoader with this many worker processes")
    parser.add_argument("--data-profile", action="store_true",
                        help="print the per-frame cost of each data stage and exit")
    parser.add_argument("--skip-compute", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    methods = ["vld", "xreid"] if args.method == "both" else [args.method]
    out = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "compute": [], "data": []}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    if args.data_batches:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "vcm"
            synthesize(root, "hitsz-vcm", ids=8, cameras=2, seed=0, frames=(24, 24),
                       image_size=(288, 144))
            if args.data_profile:
                print(json.dumps([profile_data(m, root) for m in methods], indent=2))
                return
            out["data"] = [r for m in methods for r in bench_data(m, args, root, device)]
    if not args.skip_compute:
        out["compute"] = [bench_compute(m, args, device) for m in methods]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
