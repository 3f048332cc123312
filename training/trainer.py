"""The training loop: one generic class for every method (no method branches).

``Trainer(config, data_root, run_dir).fit()`` builds dataset -> model -> objective -> optimiser and
schedule, then runs ``optim.epochs`` epochs of ``optim.iters_per_epoch`` steps. A method plugs in
through its model (``forward`` outputs, ``param_groups``, ``encode``) and its objective (named
loss terms, ``after_backward``, ``on_epoch_start``, ``state_dict``).

Run folder (only rank 0 writes)::

    RUN/config.yaml            resolved config (what ``--resume`` trains with)
    RUN/run.json               git SHA, command lines, sessions, status
    RUN/checkpoints/last.pt    resume state after the last completed epoch (tensors/primitives
                               only, readable with torch.load(weights_only=True))
    RUN/model.safetensors      inference checkpoint (model.checkpoint format)
    RUN/best.safetensors       with --select-best-on-test: the best epoch by test R1
    RUN/metrics.jsonl          one record per logged step, epoch and evaluation
    RUN/tensorboard/           the same scalars for TensorBoard
    RUN/report.json, cmc.png, ranklist.png   the final evaluation

Every write is atomic, so a crash, a non-finite loss or a full disk leaves the last good
checkpoint intact, and ``--resume`` continues from it: model, optimiser, schedule, objective
state (e.g. prototype memories), sampler epoch and every RNG are restored, so a deterministic
config reaches the same weights as an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from vvireid.indexer.sources import DatasetSplits, load_dataset
from vvireid.model.base import ReIDModel
from vvireid.model.checkpoint import save_checkpoint
from vvireid.model.config import ModelConfig
from vvireid.model.factory import create_model
from vvireid.model.fileio import write_atomic
from vvireid.model.preprocess import FramePreprocessor, PreprocessConfig
from vvireid.model.sampling import sample_train
from vvireid.model.types import Modality, Tracklet
from vvireid.training.config import TrainConfig, config_from_dict
from vvireid.training.data.samplers import (
    BUPTCameraPairSampler,
    CrossModalityIdentitySampler,
    build_sampler,
)
from vvireid.training.data.transforms import AugmentPlan, build_train_transform
from vvireid.training.data.video_dataset import FrameLoader, TrainClipDataset
from vvireid.training.distributed import (
    DistInfo,
    all_gather_objects,
    any_flag,
    barrier,
    broadcast_module,
    broadcast_object,
    gather_batch,
    gather_outputs,
    init_distributed,
)
from vvireid.training.metrics_log import MetricsLogger
from vvireid.training.objectives import TrainBatch, create_objective
from vvireid.training.optim import (
    create_optimizer,
    create_scheduler,
    describe_groups,
    is_fused,
)
from vvireid.training.report import (
    DirectionResult,
    build_report,
    evaluate_model,
    flat_metrics,
    protocol_notes,
    write_eval_outputs,
)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
RESUME_FILE = "last.pt"
MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
STATE_FORMAT = "vvireid.train_state"
STATE_VERSION = 1


def _best_ir_to_vis_r1(metrics: dict[str, float]) -> float | None:
    return metrics.get("ir_to_vis/R1")


def _xreid_variant_sum(metrics: dict[str, float]) -> float | None:
    """Sum over both directions of (best variant R1) + (best variant mAP)."""
    total = 0.0
    for direction in ("ir_to_vis", "vis_to_ir"):
        for metric in ("R1", "mAP"):
            values = [v for k, v in metrics.items()
                      if k.startswith(f"{direction}/") and k.endswith(f"/{metric}")]
            if not values:
                return None
            total += max(values)
    return total


# --select-best-on-test: each method's official rule (name, score of an evaluation, note).
# VLD and its baseline: best_model.pth is overwritten when the test ir_to_vis R1 is >= the best so
# far (ties keep the later epoch). X-ReID: the epoch maximising R1 + mAP of both directions, each
# the maximum over its four test outputs; its tie rule is not known, ties keep the later epoch.
SELECTION_RULES: dict[str, tuple[str, Any, str]] = {
    "vld": ("ir_to_vis_R1", _best_ir_to_vis_r1,
            "the epoch with the best test ir_to_vis R1 (official VLD rule)"),
    "xreid": ("sum_R1_mAP_best_variant", _xreid_variant_sum,
              "the epoch maximising R1 + mAP summed over both directions, each the best of the "
              "4 feature variants (official X-ReID rule); the official code would report those "
              "per-metric maxima, which can mix features that no single model delivers, while "
              "this report gives the fixed retrieval feature of that epoch"),
}
SELECTION_RULES["baseline"] = SELECTION_RULES["vld"]


class TrainingError(RuntimeError):
    """The run cannot continue; the message says why and which checkpoint is intact."""


class NonFiniteLossError(TrainingError):
    """A loss term became NaN or infinite."""


@dataclass(frozen=True)
class StepValues:
    """One step's loss terms: ``names`` (``loss`` first) and their values, a device tensor."""

    names: list[str]
    values: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        """The values as floats (one host sync)."""
        return dict(zip(self.names, self.values.tolist(), strict=True))


class _NanWatch:
    """The first non-finite step of a run, kept on the device so that no step waits for the host.

    ``seen`` is sticky: once set, the fused optimiser skips every later update, so the weights
    stay those from before the bad step until :meth:`first_bad` is read and the run stops.
    """

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.names = names
        self.seen = torch.zeros((), dtype=torch.bool, device=device)
        self._values = torch.zeros(len(names), device=device)
        self._index = torch.full((), -1, dtype=torch.long, device=device)
        self._count = torch.zeros((), dtype=torch.long, device=device)  # == len(self._steps)
        self._steps: list[tuple[int, int]] = []  # (epoch, iteration) of each step since a read

    def record(self, values: torch.Tensor, where: tuple[int, int]) -> None:
        now = ~torch.isfinite(values).all() & ~self.seen
        self._steps.append(where)
        self._values.copy_(torch.where(now, values, self._values))
        self._index.copy_(torch.where(now, self._count, self._index))
        self._count += 1  # on the device: a host int would be a copy that waits for the GPU
        self.seen |= now

    def first_bad(self) -> tuple[tuple[int, int], list[float]] | None:
        """``((epoch, iteration), term values)`` of the first bad step, or None (one sync)."""
        if not bool(self.seen):
            self._steps.clear()
            self._count.zero_()
            return None
        return self._steps[int(self._index)], self._values.tolist()


# ---------------------------------------------------------------------------------------------
# reproducibility


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy, torch and CUDA; deterministic cuDNN as both official codes set it."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def rng_state() -> dict[str, Any]:
    """Every global RNG as tensors and primitives (no numpy arrays: weights_only loading)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
        "has_gauss": saved["has_gauss"],
        "gauss": saved["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on CUDA, fp32 (no autocast) on CPU; ``bf16`` / ``fp32`` as asked."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def git_sha() -> str | None:
    """The commit of the vvireid source tree (with ``-dirty``), or None outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty.strip() else sha


# ---------------------------------------------------------------------------------------------
# batches


def to_train_batch(
    items: dict[str, Any],
    device: torch.device | str | None = None,
    transform: Any = None,
) -> TrainBatch:
    """Collated ``TrainClipDataset`` items -> ``TrainBatch`` (visible clips, then infrared).

    With ``device``, each part is copied there before the two modalities are joined (a join on
    the host would lose the DataLoader's pinned memory, and with it the asynchronous copy).
    Items from ``augment_on="device"`` (uint8 pixels and ``rgb_plan``/``ir_plan``) are finished
    by ``transform.apply`` on that device, in one call for the whole batch.

    Raises:
        ValueError: for uint8 items without the transform that finishes them.
    """
    rgb, ir = items["rgb"], items["ir"]
    pids = torch.as_tensor(items["pid"], dtype=torch.int64)
    half = rgb.shape[0]
    camids = torch.cat([torch.as_tensor(items["rgb_camid"]),
                        torch.as_tensor(items["ir_camid"])]).long()
    modalities = torch.cat([torch.full((half,), int(Modality.VISIBLE)),
                            torch.full((half,), int(Modality.INFRARED))]).long()
    if device is not None:
        rgb, ir = rgb.to(device, non_blocking=True), ir.to(device, non_blocking=True)
    clips = torch.cat([rgb, ir])
    if "rgb_plan" in items:
        if transform is None:
            raise ValueError("the batch holds uint8 pixels and augmentation plans "
                             "(data.augment_on=device); pass the transform that applies them")
        plan = AugmentPlan.cat([items["rgb_plan"], items["ir_plan"]])
        clips = transform.apply(clips, plan.to(clips.device))
    batch = TrainBatch(clips=clips, pids=torch.cat([pids, pids]), camids=camids,
                       modalities=modalities)
    return batch if device is None else batch.to(device)


class EpochPassDataset(Dataset):
    """Every training tracklet once, as one clip with test-time preprocessing.

    Objectives that rebuild state at each epoch (X-ReID's prototype memories) read it. Frames
    are chosen with the training rule, seeded by ``(seed, epoch, index)``, as the official memory
    pass draws a restricted-random clip per tracklet without augmentation.
    """

    def __init__(self, tracklets: list[Tracklet], preprocess: PreprocessConfig, sampling: str,
                 seed: int, epoch: int, on_bad_frame: str) -> None:
        self.tracklets, self.sampling, self.seed, self.epoch = tracklets, sampling, seed, epoch
        self.preprocessor = FramePreprocessor(preprocess)
        self.frames = FrameLoader(on_bad_frame)

    def __len__(self) -> int:
        return len(self.tracklets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int]:
        tracklet = self.tracklets[index]
        rng = np.random.default_rng([self.seed, 7, self.epoch, index])
        indices = sample_train(len(tracklet), self.preprocessor.config.seq_len, self.sampling, rng)
        images = self.frames.load(tracklet, indices)
        clip = torch.stack([self.preprocessor.frame_tensor(images[i]) for i in indices])
        return clip, int(tracklet.pid), int(tracklet.camid), int(tracklet.modality)


def _epoch_pass_batches(loader: DataLoader) -> Iterator[TrainBatch]:
    for clips, pids, camids, modalities in loader:
        yield TrainBatch(clips, pids.long(), camids.long(), modalities.long())


# ---------------------------------------------------------------------------------------------
# files


def _atomic_torch_save(path: Path, obj: Any) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def _guard_disk(what: str, path: Path, intact: str, action: Any,
                hint: str = "free space, then continue with --resume") -> None:
    """Run a file write; a full disk becomes a TrainingError naming what is still intact."""
    try:
        action()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TrainingError(f"disk full while writing the {what} {path}; {intact}; {hint}") from None
        raise TrainingError(f"cannot write the {what} {path}: {exc}; {intact}") from None


def load_resume_state(path: Path) -> dict[str, Any]:
    """Read and check a resume file (weights_only: never unpickles arbitrary objects)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"{path}: no resume checkpoint (nothing to resume)") from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on corrupt files
        raise TrainingError(f"{path}: unreadable resume checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path}: not a vvireid resume checkpoint")
    if state.get("version") != STATE_VERSION:
        raise TrainingError(f"{path}: resume format version {state.get('version')} is not supported")
    return state


# Keys that change where work runs but no value a run computes: a resumed run may differ in them
# (and a run saved before the key existed lacks it).
RESUME_NEUTRAL_KEYS = ("data.augment_on",)


def _config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if f"{prefix}{key}" not in RESUME_NEUTRAL_KEYS:
                out += _config_diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix[:-1]} (run: {a!r}, now: {b!r})"]


def read_run_config(run_dir: Path) -> TrainConfig:
    """The resolved config a run was started with (``RUN/config.yaml``)."""
    path = run_dir / CONFIG_FILE
    try:
        return config_from_dict(yaml.safe_load(path.read_text()))
    except FileNotFoundError:
        raise TrainingError(f"{path}: missing; is {run_dir} a vvireid run folder?") from None
    except (yaml.YAMLError, ValueError) as exc:
        raise TrainingError(f"{path}: unusable ({exc})") from None


# ---------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Generic trainer (module docstring).

    Args:
        config: the recipe.
        data_root: dataset folder (or manifest) in ``config.data.format``.
        run_dir: run folder (created). Without ``resume`` it must not hold a run already.
        pretrained: CLIP weights (file or open_clip tag); overrides ``config.model.pretrained``.
        device: ``auto``, ``cpu`` or ``cuda``.
        resume: continue from ``RUN/checkpoints/last.pt``.
        select_best_on_test: keep the epoch the method's official code keeps
            (``SELECTION_RULES``; optimistic: the test set chooses the model); default is the
            final epoch.
        dist: process-group info (default: initialised from the environment).
    """

    def __init__(
        self,
        config: TrainConfig,
        data_root: str | Path,
        run_dir: str | Path,
        *,
        pretrained: str | None = None,
        device: str = "auto",
        resume: bool = False,
        select_best_on_test: bool = False,
        dist: DistInfo | None = None,
    ) -> None:
        self.config = config
        self.data_root = Path(data_root).expanduser()
        self.run_dir = Path(run_dir).expanduser()
        self.pretrained = pretrained or config.model.pretrained
        self.resume = resume
        self.select_best = select_best_on_test
        self.dist = dist or init_distributed(device)
        self.device = self.dist.device
        self.amp_dtype = autocast_dtype(config.precision, self.device)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.start_epoch = 0
        self.global_step = 0
        self.last_results: dict[str, DirectionResult] | None = None
        self.last_eval_epoch = -1
        self._check_run_dir()
        seed_everything(config.seed, config.deterministic)
        self.splits = self._load_dataset()
        self._build()
        if resume:
            self._load_resume()
        self._wrap_ddp()
        self._write_run_files()
        self.metrics = MetricsLogger(
            self.run_dir, enabled=self.dist.is_main,
            resume_epoch=self.start_epoch if resume else None,
            resume_step=self.global_step if resume else None,
        )

    # ---- setup ---------------------------------------------------------------------------------
    @property
    def resume_path(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR / RESUME_FILE

    def _check_run_dir(self) -> None:
        if self.resume and not self.resume_path.is_file():
            raise TrainingError(f"{self.resume_path}: no resume checkpoint (nothing to resume)")
        if not self.resume and self.resume_path.exists():
            raise TrainingError(
                f"{self.run_dir} already holds a run; pass --resume to continue it or choose "
                "another --out"
            )

    def _load_dataset(self) -> DatasetSplits:
        data = self.config.data
        options = dict(data.options)
        if not self.data_root.exists():
            raise TrainingError(f"{self.data_root}: data root does not exist")
        try:
            splits = load_dataset(data.format, self.data_root, **options)
        except TypeError as exc:
            raise TrainingError(f"data.options {options}: not accepted by the {data.format} reader "
                                f"({exc})") from None
        log.info("dataset %s: %d train tracklets, %d identities, %d cameras", splits.name,
                 len(splits.train), splits.num_train_pids, splits.num_train_cams)
        return splits

    def _build(self) -> None:
        cfg, splits, dist = self.config, self.splits, self.dist
        m = cfg.model
        self.test_sampling = cfg.data.test_sampling or splits.test_sampling
        model = create_model(
            ModelConfig(
                m.method, splits.num_train_pids, backbone=m.backbone, image_size=m.image_size,
                seq_len=m.seq_len, num_cameras=splits.num_train_cams,
                test_sampling=self.test_sampling, options=m.options,
            ),
            pretrained=None if self.resume else self.pretrained,
        )
        if dist.enabled and self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model: ReIDModel = model.to(self.device)
        self.objective = create_objective(m.method, self.model, cfg.loss)
        self.optimizer = create_optimizer(self.model, cfg.optim)
        self.scheduler = create_scheduler(self.optimizer, cfg.optim)
        log.info("optimiser groups: %s", describe_groups(self.optimizer))
        self.sampler = self._sampler()
        transform = build_train_transform(cfg.augment, tuple(m.image_size),
                                          pair_flip=cfg.data.pair_flip)
        self.train_set = TrainClipDataset(
            splits.train, transform, seq_len=m.seq_len, sampling=cfg.data.train_sampling,
            aligned_pairs=self.sampler.aligned_frames, seed=cfg.seed,
            on_bad_frame=cfg.data.on_bad_frame, augment_on=cfg.data.augment_on,
        )
        workers = cfg.data.num_workers
        self.loader = DataLoader(
            self.train_set, batch_sampler=self.sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
        )

    def _sampler(self) -> CrossModalityIdentitySampler | BUPTCameraPairSampler:
        data, dist = self.config.data, self.dist
        try:
            return build_sampler(
                data.sampler, self.splits, ids_per_batch=data.ids_per_batch,
                tracklets_per_id=data.tracklets_per_id,
                num_batches=self.config.optim.iters_per_epoch, seed=self.config.seed,
                rank=dist.rank, world_size=dist.world_size)
        except ValueError as exc:
            raise TrainingError(f"cannot build batches from {self.data_root}: {exc}") from None

    def _wrap_ddp(self) -> None:
        self.ddp_model: torch.nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # Some methods hold trainable parameters that a given configuration leaves unused.
            self.ddp_model = DistributedDataParallel(self.model, device_ids=device_ids,
                                                     find_unused_parameters=True)
        if self.config.compile:
            # The forward only: losses and optimiser stay eager (the fused step is one kernel).
            self.ddp_model = torch.compile(self.ddp_model)

    def _write_run_files(self) -> None:
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_text = yaml.safe_dump(self.config.to_dict(), sort_keys=False)
        write_atomic(self.run_dir / CONFIG_FILE,
                           lambda tmp: Path(tmp).write_text(config_text))
        run_path = self.run_dir / RUN_FILE
        info = json.loads(run_path.read_text()) if self.resume and run_path.exists() else {}
        info.setdefault("sessions", []).append({
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv, "git_sha": git_sha(),
            "resumed_at_epoch": self.start_epoch if self.resume else None,
            "world_size": self.dist.world_size, "device": str(self.device),
            "torch": torch.__version__,
        })
        info.update(config=self.config.name, dataset=self.splits.name,
                    data_root=str(self.data_root), status="running",
                    git_sha=info["sessions"][-1]["git_sha"])
        text = json.dumps(info, indent=2)
        write_atomic(run_path, lambda tmp: Path(tmp).write_text(text))

    def _set_status(self, status: str) -> None:
        """Record the run's status in ``run.json``; best effort (never hides the real error)."""
        path = self.run_dir / RUN_FILE
        if not self.dist.is_main or not path.exists():
            return
        try:
            info = json.loads(path.read_text())
            info["status"] = status
            text = json.dumps(info, indent=2)
            write_atomic(path, lambda tmp: Path(tmp).write_text(text))
        except (OSError, ValueError) as exc:
            log.warning("cannot update %s: %s", path, exc)

    # ---- resume --------------------------------------------------------------------------------
    def _resume_state(self, epoch: int) -> dict[str, Any]:
        rngs = all_gather_objects(self.dist, rng_state())
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "epoch": epoch,
            "global_step": self.global_step,
            "config": self.config.to_dict(),
            "world_size": self.dist.world_size,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "objective": self.objective.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rngs,
            "history": self.history,
            "best": self.best,
        }

    def _load_resume(self) -> None:
        state = load_resume_state(self.resume_path)
        diff = _config_diff(state["config"], self.config.to_dict())
        if diff:
            raise TrainingError(
                f"{self.resume_path}: the run was trained with another config; a resumed run must "
                f"use the same one. Differences: {'; '.join(diff[:8])}"
            )
        try:
            self.model.load_state_dict(state["model"], strict=True)
        except RuntimeError as exc:
            raise TrainingError(f"{self.resume_path}: model weights do not fit ({exc})") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state["objective"])
        self.sampler.load_state_dict(state["sampler"])
        rngs = state["rng"]
        if len(rngs) != self.dist.world_size:
            log.warning("resume: the run had %d processes, now %d; RNG streams differ from an "
                        "uninterrupted run", len(rngs), self.dist.world_size)
        set_rng_state(rngs[self.dist.rank % len(rngs)])
        self.start_epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.best = state["best"]
        log.info("resuming %s after epoch %d (step %d)", self.run_dir, self.start_epoch,
                 self.global_step)

    def save(self, epoch: int, metrics: dict[str, float]) -> None:
        """Write the resume state (after ``epoch`` completed epochs) and the inference checkpoint."""
        state = self._resume_state(epoch)
        if not self.dist.is_main:
            return
        intact = (f"the checkpoint of epoch {epoch - 1} is intact" if epoch > 1
                  else "no earlier checkpoint exists")
        hint = ("free space, then start the run again" if epoch == 1
                else "free space, then continue with --resume")
        path = self.resume_path
        _guard_disk("resume checkpoint", path, intact, lambda: _atomic_torch_save(path, state), hint)
        model_path = self.run_dir / MODEL_FILE
        _guard_disk("model checkpoint", model_path, f"{path} (epoch {epoch}) is intact",
                    lambda: save_checkpoint(model_path, self.model, self._extra(epoch, metrics)))

    def _extra(self, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        return {"dataset": self.splits.name, "data_format": self.config.data.format,
                "epoch": epoch, "metrics": metrics, "config": self.config.name,
                "num_train_pids": self.splits.num_train_pids, "git_sha": git_sha()}

    # ---- one step ------------------------------------------------------------------------------
    def _autocast(self) -> Any:
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    @property
    def _sync_free(self) -> bool:
        """Whether NaN checks can wait for a log step: one process and a fused Adam(W).

        A fused optimiser skips its update on a device-side flag, so a non-finite step changes
        no weight although nobody has looked at the loss yet; the flag stays set (every later
        step is skipped too) until :meth:`check_finite` reads it and raises. With several ranks
        or another optimiser the check stays per step, as before.
        """
        return not self.dist.enabled and is_fused(self.optimizer)

    def train_step(self, batch: TrainBatch, epoch: int, iteration: int) -> StepValues:
        """Forward, loss terms, backward, objective hook, optimiser step; returns the term values.

        The values stay on the device (``StepValues.as_dict`` reads them back), so a step never
        waits for the GPU; :meth:`train_epoch` reads them at log steps only.

        Raises:
            NonFiniteLossError: at once on the per-step path; on the sync-free path the step is
                recorded and :meth:`check_finite` raises.
        """
        batch = batch.to(self.device)
        with self._autocast():
            out = self.ddp_model(batch.clips, batch.camids)
        out = gather_outputs(self.dist, out, batch.clips.shape[0], self.splits.num_train_pids)
        full = gather_batch(self.dist, batch)
        with self._autocast():
            terms = self.objective(out, full)
        if not terms:
            raise TrainingError("the objective returned no loss terms")
        loss = torch.stack([t.float() for t in terms.values()]).sum()
        names = ["loss", *terms]
        values = torch.stack([loss.detach(), *(t.detach().float() for t in terms.values())])
        if self._sync_free:
            self._record_finite(names, values, epoch, iteration)
        else:
            self._raise_if_non_finite(names, values.tolist(), epoch, iteration)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.objective.after_backward(out, full)
        if self.config.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.optimizer.step()
        return StepValues(names, values)

    def _raise_if_non_finite(
        self, names: list[str], values: list[float], epoch: int, iteration: int
    ) -> None:
        named = dict(zip(names, values, strict=True))
        bad = [name for name, v in named.items() if not np.isfinite(v)]
        if any_flag(self.dist, bool(bad)):
            term = next((n for n in bad if n != "loss"), bad[0] if bad else "loss (on another rank)")
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch + 1}, iteration {iteration + 1}: term {term!r} is "
                f"{named.get(term, float('nan'))}; stopped before updating the weights"
            )

    def _record_finite(self, names: list[str], values: Any, epoch: int, iteration: int) -> None:
        """Device-side note of the first non-finite step; sets the fused optimiser's skip flag."""
        watch = getattr(self, "_nan_watch", None)
        if watch is None or watch.names != names:
            watch = self._nan_watch = _NanWatch(names, values.device)
        watch.record(values, (epoch, iteration))
        self.optimizer.found_inf = watch.seen.float()  # fused Adam(W) skips the update

    def check_finite(self) -> None:
        """Raise for a non-finite step recorded by the sync-free path (one host sync).

        Raises:
            NonFiniteLossError: naming the first bad step's epoch, iteration and term; no weight
                was updated from that step on.
        """
        watch = getattr(self, "_nan_watch", None)
        if watch is None:
            return
        found = watch.first_bad()
        if found is not None:
            (epoch, iteration), values = found
            self._raise_if_non_finite(watch.names, values, epoch, iteration)

    # ---- epochs --------------------------------------------------------------------------------
    def _epoch_pass(self, epoch: int) -> None:
        if not self.objective.needs_epoch_pass:
            return
        dataset = EpochPassDataset(self.splits.train, self.model.preprocess,
                                   self.config.data.train_sampling, self.config.seed, epoch,
                                   self.config.data.on_bad_frame)
        loader = DataLoader(dataset, batch_size=self.config.eval.batch_size,
                            num_workers=self.config.data.num_workers,
                            pin_memory=self.device.type == "cuda")
        self.objective.on_epoch_start(self.model, _epoch_pass_batches(loader))

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch of ``iters_per_epoch`` steps; returns the mean of every term."""
        cfg = self.config
        self.scheduler.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        self._epoch_pass(epoch)
        self.model.train()
        sums: Any = None  # per-term sums on the device, read back at log steps and the end
        names: list[str] = []
        steps, started = 0, time.perf_counter()
        bar = tqdm(self.loader, total=len(self.sampler), desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
                   disable=not self.dist.is_main, dynamic_ncols=True, leave=False)
        lr = self.optimizer.param_groups[0]["lr"]
        for iteration, items in enumerate(bar):
            batch = to_train_batch(items, self.device, self.train_set.transform)
            step = self.train_step(batch, epoch, iteration)
            names, step_values = step.names, step.values
            self.global_step += 1
            steps += 1
            sums = step_values.clone() if sums is None else sums.add_(step_values)
            if iteration % cfg.log_every == 0 or iteration == len(self.sampler) - 1:
                self.check_finite()
                values = dict(zip(names, step_values.tolist(), strict=True))
                self.metrics.log("train", self.global_step, {**values, "lr": lr},
                                 epoch=epoch, iteration=iteration)
                bar.set_postfix(loss=f"{values['loss']:.3f}")
        bar.close()
        self.check_finite()  # before anything of this epoch is saved
        seconds = time.perf_counter() - started
        tracklets = steps * 2 * cfg.data.ids_per_batch * cfg.data.tracklets_per_id
        totals = [] if sums is None else sums.tolist()
        means = {name: total / max(steps, 1) for name, total in zip(names, totals, strict=True)}
        self.metrics.log("epoch", self.global_step, {**means, "lr": lr, "seconds": round(seconds, 2),
                         "tracklets_per_s": round(tracklets / max(seconds, 1e-9), 2)}, epoch=epoch)
        log.info("epoch %d/%d: loss %.4f (%s) in %.1fs", epoch + 1, cfg.optim.epochs,
                 means.get("loss", float("nan")),
                 ", ".join(f"{k} {v:.3f}" for k, v in means.items() if k != "loss"), seconds)
        return means

    def evaluate(self, epoch: int, *, record: bool = True) -> dict[str, float]:
        """Evaluate both directions (every rank takes part); with ``record``, log the metrics,
        append them to the history and update the best epoch."""
        cfg = self.config
        results = evaluate_model(
            self.model, self.splits, device=self.device, test_sampling=self.test_sampling,
            dense=cfg.eval.dense, batch_size=cfg.eval.batch_size,
            num_workers=cfg.data.num_workers, max_rank=cfg.eval.max_rank,
            on_bad_frame=cfg.data.on_bad_frame, dist=self.dist,
            variants=self.select_best and len(self.model.feature_variants) > 1,
        )
        metrics = flat_metrics(results) if results is not None else {}
        metrics = broadcast_object(self.dist, metrics)
        self.last_results, self.last_eval_epoch = results, epoch
        if not record:
            return metrics
        self.history.append({"epoch": epoch + 1, **metrics})
        self.metrics.log("eval", self.global_step, metrics, epoch=epoch)
        log.info("eval after epoch %d: %s", epoch + 1,
                 ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items() if k.endswith(("R1", "mAP"))))
        score = self._selection_rule[1](metrics) if self.select_best else None
        if score is not None and (self.best is None or score >= self.best["score"]):
            self.best = {"epoch": epoch + 1, "score": score, "metrics": metrics}
            if self.dist.is_main:
                path = self.run_dir / BEST_FILE
                _guard_disk("best checkpoint", path, "the resume checkpoint is intact",
                            lambda: save_checkpoint(path, self.model, {**self._extra(epoch + 1, metrics),
                                                                      "selection": "best_on_test"}))
        return metrics

    def fit(self) -> dict[str, Any]:
        """Train to the end (or from the resume point), then evaluate and write the report.

        Returns:
            The final report (rank 0; other ranks get an empty dict).

        Raises:
            TrainingError: non-finite loss, full disk, unusable data; the last good checkpoint
                stays intact in every case.
        """
        cfg = self.config
        try:
            for epoch in range(self.start_epoch, cfg.optim.epochs):
                self.train_epoch(epoch)
                last = epoch == cfg.optim.epochs - 1
                metrics = {}
                if last or (cfg.eval.every and (epoch + 1) % cfg.eval.every == 0):
                    metrics = self.evaluate(epoch)
                self.save(epoch + 1, metrics)
                barrier(self.dist)
            report = self._finish()
        except BaseException:
            self._set_status("failed")
            raise
        finally:
            self.metrics.close()
        self._set_status("finished")
        return report

    @property
    def _selection_rule(self) -> tuple[str, Any, str]:
        """The method's official best-epoch rule (VLD's for a method without one of its own)."""
        return SELECTION_RULES.get(self.config.model.method, SELECTION_RULES["vld"])

    def _load_best(self, path: Path) -> None:
        """Load the best epoch's weights on rank 0 and share them with the other ranks."""
        if self.dist.is_main:
            from safetensors.torch import load_file

            self.model.load_state_dict(load_file(str(path), device=str(self.device)))
        broadcast_module(self.dist, self.model)
        self.last_eval_epoch = -1

    def _finish(self) -> dict[str, Any]:
        """Pick the model (final, or best on test with the flag) and write the report files."""
        cfg = self.config
        epochs = cfg.optim.epochs
        selection = {"rule": "final", "epoch": epochs,
                     "note": "the final epoch's model; no test-set model selection"}
        if self.select_best and self.best is not None:
            name, _, rule_note = self._selection_rule
            selection = {"rule": "best_on_test", "epoch": self.best["epoch"], "metric": name,
                         "score": self.best["score"],
                         "note": f"--select-best-on-test: {rule_note}; this is model selection on "
                                 "the test set and overstates what unseen data would give"}
            best_path = self.run_dir / BEST_FILE
            if self.best["epoch"] != self.last_eval_epoch + 1:
                self._load_best(best_path)
            if self.dist.is_main:
                model_path = self.run_dir / MODEL_FILE
                _guard_disk("model checkpoint", model_path, f"{best_path} is intact",
                            lambda: write_atomic(model_path,
                                                       lambda tmp: shutil.copyfile(best_path, tmp)))
        if self.last_eval_epoch != selection["epoch"] - 1:  # e.g. resumed after the last epoch
            self.evaluate(selection["epoch"] - 1, record=False)
        if not self.dist.is_main or self.last_results is None:
            return {}
        notes = protocol_notes(self.splits.name, self.splits.filter_same_camera,
                               self.test_sampling, cfg.model.seq_len, self.model.similarity,
                               cfg.eval.dense)
        report = build_report(
            self.last_results, dataset=self.splits.name, notes=notes, selection=selection,
            checkpoint=str(self.run_dir / MODEL_FILE), method=cfg.model.method, config=cfg.name,
            git_sha=git_sha(), history=self.history,
        )
        paths = write_eval_outputs(self.run_dir, report, self.last_results,
                                   filter_same_camera=self.splits.filter_same_camera)
        log.info("report written to %s", paths["report"])
        return report

