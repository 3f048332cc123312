"""Data-parallel training on CPU (gloo): the gathered global batch gives the one-process gradient,
and a 2-process ``torchrun`` fit of the smoke recipe completes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from vvireid.training.data.synth import synthesize
from vvireid.training.distributed import DistInfo, gather_batch, gather_outputs
from vvireid.training.losses import wrt_loss
from vvireid.training.objectives.base import TrainBatch

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """8 visible then 8 infrared inputs, index-aligned pids (4 ids x 2 per modality)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, generator=gen)
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3] * 2)
    return x, pids


def _loss(out: dict, batch: TrainBatch) -> torch.Tensor:
    return wrt_loss(out["feats"], batch.pids) + out["text"].pow(2).mean()


def _worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    text = torch.nn.Parameter(torch.ones(8, 3))  # per-class: 8 rows == num_classes == 2B
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x, pids = _global_batch()
    # Rank r holds visible rows r*4..r*4+3 and the infrared rows aligned with them.
    vis = slice(rank * 4, rank * 4 + 4)
    ir = slice(8 + rank * 4, 8 + rank * 4 + 4)
    local_x = torch.cat([x[vis], x[ir]])
    local = TrainBatch(local_x, torch.cat([pids[vis], pids[ir]]), torch.zeros(8, dtype=torch.long),
                       torch.tensor([0] * 4 + [1] * 4))
    info = DistInfo(rank, world, 0, torch.device("cpu"))
    out = gather_outputs(info, {"feats": ddp(local_x), "text": text * 1.0}, 8, num_classes=8)
    full = gather_batch(info, local)
    loss = _loss(out, full)
    loss.backward()
    # The per-class tensor is shared, not gathered; DDP does not see `text`, average it by hand.
    dist.all_reduce(text.grad)
    text.grad /= world
    if rank == 0:
        results["loss"] = loss.item()
        results["pids"] = full.pids.tolist()
        results["modalities"] = full.modalities.tolist()
        results["grad_w"] = model.weight.grad.clone()
        results["grad_text"] = text.grad.clone()
    dist.destroy_process_group()


def test_gathered_batch_gives_the_single_process_gradient():
    # A spawned manager: forking this process (Milvus Lite's gRPC threads may be live in it by
    # now) can abort the child.
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    text = torch.nn.Parameter(torch.ones(8, 3))
    x, pids = _global_batch()
    batch = TrainBatch(x, pids, torch.zeros(16, dtype=torch.long), torch.tensor([0] * 8 + [1] * 8))
    loss = _loss({"feats": model(x), "text": text * 1.0}, batch)
    loss.backward()
    assert results["pids"] == pids.tolist()  # global layout: all visible rows, then all infrared
    assert results["modalities"] == [0] * 8 + [1] * 8
    assert results["loss"] == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(results["grad_w"], model.weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results["grad_text"], text.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_fit_the_smoke_recipe(tmp_path_factory, tmp_path):
    root = tmp_path_factory.getbasetemp() / "synth-vcm-ddp"
    if not root.exists():
        synthesize(root, "hitsz-vcm", ids=8, cameras=2, seed=5, frames=(12, 12), image_size=(64, 32))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "vvireid.training", "fit", "--config", "smoke",
           "--data-root", str(root), "--out", str(run), "--device", "cpu",
           "--set", "optim.epochs=1", "--set", "optim.iters_per_epoch=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # only rank 0 prints
    assert set(summary["directions"]) == {"ir_to_vis", "vis_to_ir"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == [0, 1]  # written once (rank 0), not once per rank
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["sessions"][0]["world_size"] == 2
    assert (run / "model.safetensors").exists() and (run / "checkpoints" / "last.pt").exists()
