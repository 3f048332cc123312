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
frame sampling) and the recipe's augmentation in this process (one worker's cost).

Both parts report tracklets per second; a training step needs ``2 * ids * tracklets_per_id``
tracklets, so the data side needs about compute_rate / data_rate_per_worker workers.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from vvireid.indexer.sources import load_dataset
from vvireid.model.config import ModelConfig
from vvireid.model.factory import create_model
from vvireid.model.types import Modality
from vvireid.training.config import load_config
from vvireid.training.data.samplers import CrossModalityIdentitySampler
from vvireid.training.data.synth import synthesize
from vvireid.training.data.transforms import build_train_transform
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


def bench_data(method: str, args: argparse.Namespace, root: Path) -> dict:
    config = load_config(RECIPES[method], ["model.pretrained=null"])
    m, data = config.model, config.data
    splits = load_dataset("hitsz-vcm", root)
    ids = min(max(2, args.batch_ids or data.ids_per_batch), splits.num_train_pids)
    sampler = CrossModalityIdentitySampler.from_splits(
        splits, ids, data.tracklets_per_id, args.data_batches, seed=0)
    transform = build_train_transform(config.augment, tuple(m.image_size))
    dataset = TrainClipDataset(splits.train, transform, seq_len=m.seq_len,
                               sampling=data.train_sampling, seed=0)
    collate = torch.utils.data.default_collate
    start = time.perf_counter()
    tracklets = 0
    for keys in sampler:
        batch = to_train_batch(collate([dataset[k] for k in keys]))
        tracklets += batch.clips.shape[0]
    seconds = time.perf_counter() - start
    return {
        "method": method, "augment": config.augment, "batches": args.data_batches,
        "tracklets": tracklets, "frames": tracklets * m.seq_len,
        "seconds_per_batch": round(seconds / args.data_batches, 4),
        "tracklets_per_s_per_worker": round(tracklets / seconds, 2),
        "ms_per_frame": round(1000 * seconds / (tracklets * m.seq_len), 3),
    }


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
            out["data"] = [bench_data(m, args, root) for m in methods]
    if not args.skip_compute:
        out["compute"] = [bench_compute(m, args, device) for m in methods]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
