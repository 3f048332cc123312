"""Inference-time execution of a ``ReIDModel``: cast weights, fixed batch buckets, optional compile.

Why not autocast: autocast re-casts every weight at every call and disables PyTorch's fused
multi-head-attention fast path (which dispatches to flash / memory-efficient SDPA), so a model whose
weights are *stored* in bf16 runs measurably faster than the same model under autocast. Why buckets:
``torch.compile`` (and the CUDA graphs that its ``reduce-overhead`` mode records) specialise on
shapes; padding every batch up to one of a few static sizes means a handful of compilations, all
done by :meth:`InferenceModel.warm_up` at start-up, and none on the request path. Padding is safe
because at inference every method treats each clip independently (BatchNorm in eval mode uses its
running statistics); ``tests/model/test_inference.py`` checks that for every registered method.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from vvireid.model.base import UNKNOWN_CAMERA, ReIDModel, check_camids
from vvireid.model.preprocess import normalize_pixels

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on CUDA, fp32 elsewhere; otherwise one of :data:`DTYPES`.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def buckets_up_to(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, then ``max_batch`` itself: the serving buckets.

    A batch never pads to more than twice its size (less than 2x wasted work), and the largest
    bucket is the caller's own batch limit, so a full micro-batch runs unpadded.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    buckets = [1]
    while buckets[-1] * 2 < max_batch:
        buckets.append(buckets[-1] * 2)
    return tuple(sorted({*buckets, max_batch}))


def bucket_for(size: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``size`` clips (the largest bucket when none does)."""
    for bucket in buckets:
        if bucket >= size:
            return bucket
    return buckets[-1]


class InferenceModel:
    """A ``ReIDModel`` prepared for serving and indexing on one device.

    Args:
        model: the loaded model; it is moved to ``device``, put in eval mode and, for a dtype other
            than fp32, has its floating-point weights cast to that dtype (in place).
        device: where to run.
        dtype: the weights' and activations' dtype (see :func:`parse_dtype`).
        compile: wrap the model's ``encode`` in ``torch.compile`` (``reduce-overhead`` on CUDA:
            CUDA graphs per bucket). Off by default on CPU, where compiling costs minutes.
        buckets: the static batch sizes; larger batches are cut into chunks of the largest.
        pad: pad every chunk up to its bucket (default: only when compiled, where static shapes
            are what avoids recompiling; eager code gains nothing from padding).
        normalize: apply the model's similarity normalisation (``encode(normalize=...)``); the
            tracklet encoder asks for un-normalised clip features and averages them itself.

    Thread model: CUDA graph trees (``reduce-overhead``) are recorded per thread, so a graph
    warmed in the main thread would be recorded again by the server's batch worker on its first
    request. When compiled on CUDA every model call therefore runs on this object's own single
    thread, whichever thread calls :meth:`encode`.
    """

    def __init__(
        self,
        model: ReIDModel,
        device: torch.device,
        *,
        dtype: torch.dtype = torch.float32,
        compile: bool = False,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        pad: bool | None = None,
        normalize: bool = True,
    ) -> None:
        if not buckets or any(b < 1 for b in buckets):
            raise ValueError(f"buckets must be positive batch sizes, got {list(buckets)}")
        self.model = model.to(device).eval()
        if dtype != torch.float32:
            self.model.to(dtype)
        self.device = device
        self.dtype = dtype
        self.buckets = tuple(sorted({int(b) for b in buckets}))
        self.compiled = compile
        self.pad = compile if pad is None else pad
        self.normalize = normalize
        self._encode: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] = self._forward
        self._thread: ThreadPoolExecutor | None = None
        if compile:
            mode = "reduce-overhead" if device.type == "cuda" else None
            _allow_recompiles(len(self.buckets))
            self._encode = torch.compile(self._forward, mode=mode, dynamic=False)
            if device.type == "cuda":
                self._thread = ThreadPoolExecutor(
                    1, thread_name_prefix="vvireid-inference", initializer=_graph_tree_tls
                )

    def _forward(self, clips: torch.Tensor, camids: torch.Tensor | None) -> torch.Tensor:
        """``ReIDModel.encode`` minus its checks and train/eval toggling (done once, outside).

        Compiled as it stands: shape checks and ``Module.train`` calls would break the graph.
        """
        feats = self.model._encode(clips, camids)
        if self.normalize and self.model.similarity == "cosine":
            feats = torch.nn.functional.normalize(feats, dim=1)
        return feats

    def close(self) -> None:
        """Stop the inference thread (if any); the object must not be used afterwards."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    @torch.no_grad()
    def encode(self, clips: torch.Tensor, camids: torch.Tensor | None = None) -> torch.Tensor:
        """Features of ``clips`` as fp32 on the CPU, computed in bucket-sized model calls.

        ``clips`` are either the model's normalised input (any float dtype) or uint8 RGB pixels
        (``FramePreprocessor.pixel_clips``), which are moved as uint8 and normalised on the
        device one bucket at a time (:func:`~vvireid.model.preprocess.normalize_pixels`), so the
        host never holds or transfers the 4x larger float clips. The dtype decides.

        Shape: clips [B, T, 3, H, W] (any device), camids [B] or None -> [B, D].

        Raises:
            ValueError: clips of the wrong shape for this model, or camids of another length.
        """
        self.model.check_clips(clips)
        if camids is not None and len(camids) != len(clips):
            raise ValueError(f"{len(clips)} clips but {len(camids)} camids")
        camids = self._canonical_camids(camids, len(clips))
        if self._thread is not None:
            return self._thread.submit(self._encode_chunks, clips, camids).result()
        return self._encode_chunks(clips, camids)

    def _canonical_camids(self, camids: torch.Tensor | None, size: int) -> torch.Tensor | None:
        """One input signature per model, so a compiled graph never meets a second one.

        A model without a camera table ignores camids (passed as None, as the ONNX export does);
        one with a table gets -1 (unknown camera) for None, which its encode treats the same way.
        """
        if int(self.model.config.num_cameras) == 0:
            return None
        if camids is None:
            return torch.full((size,), UNKNOWN_CAMERA, dtype=torch.long)
        camids = torch.as_tensor(camids, dtype=torch.long)
        if camids.device.type == "cpu" and camids.numel():
            # Checked here, on the host: on a GPU the model can only assert, which is fatal.
            check_camids(camids, int(self.model.config.num_cameras))
        return camids

    @torch.no_grad()
    def _encode_chunks(self, clips: torch.Tensor, camids: torch.Tensor | None) -> torch.Tensor:
        out = []
        for start in range(0, len(clips), self.max_batch):
            chunk = clips[start : start + self.max_batch]
            cams = None if camids is None else camids[start : start + self.max_batch]
            out.append(self._run_bucket(chunk, cams))
        if not out:
            return torch.zeros(0, self.model.embed_dim)
        return torch.cat(out)

    def _run_bucket(self, clips: torch.Tensor, camids: torch.Tensor | None) -> torch.Tensor:
        size = len(clips)
        bucket = bucket_for(size, self.buckets) if self.pad else size
        if clips.dtype == torch.uint8:
            pixels = clips.to(self.device, non_blocking=True)
            clips = normalize_pixels(pixels, self.model.preprocess).to(self.dtype)
        else:
            clips = clips.to(self.device, dtype=self.dtype, non_blocking=True)
        if bucket > size:
            pad = clips[:1].expand(bucket - size, *clips.shape[1:])
            clips = torch.cat([clips, pad])
        if camids is not None:
            camids = camids.to(self.device)
            if bucket > size:
                camids = torch.cat([camids, camids[:1].expand(bucket - size)])
        feats = self._encode(clips, camids)
        return feats[:size].float().cpu()

    def warm_up(self, with_camids: bool = True) -> float:
        """Run every bucket once (compiling it when ``compile`` is on); returns the seconds spent.

        ``with_camids`` is kept for callers; camids are canonicalised per model (see
        ``_canonical_camids``), so warm-up and requests always share one signature.
        Without padding the model sees any batch size, so one small call (first-call allocations
        and kernel selection) is all that warming can do.
        """
        started = time.perf_counter()
        try:
            self._run_buckets(with_camids)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: serve eagerly instead
            if not self.compiled:
                raise
            # e.g. no C compiler for Triton in a slim image, or an op inductor cannot lower: the
            # features are the same without compiling, only slower, so do not refuse to start.
            log.warning(
                "torch.compile failed while warming up (%s: %s); running the model eagerly",
                type(exc).__name__, exc,
            )
            self._encode, self.compiled = self._forward, False
            self._run_buckets(with_camids)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        log.info(
            "warmed up %d batch buckets (%s, %s%s) in %.1f s", len(self.buckets), self.device,
            str(self.dtype).replace("torch.", ""), ", compiled" if self.compiled else "", seconds,
        )
        return seconds


    def _run_buckets(self, with_camids: bool) -> None:
        height, width = self.model.config.image_size
        for bucket in self.buckets if self.pad else self.buckets[:1]:
            clips = torch.zeros(bucket, self.model.seq_len, 3, height, width)
            camids = torch.zeros(bucket, dtype=torch.long) if with_camids else None
            self.encode(clips, camids)


def _graph_tree_tls() -> None:
    """Give this thread the thread-local state CUDA graph trees keep per thread.

    Some torch releases (2.11, for one) create it only in the main thread and in autograd's
    threads, and assert when another thread records a graph; later releases create it lazily.
    """
    try:
        from torch._inductor import cudagraph_trees
    except ImportError:  # pragma: no cover - inductor absent: nothing is compiled with graphs
        return
    local = cudagraph_trees.local
    if hasattr(local, "tree_manager_containers"):
        return
    initialize = getattr(cudagraph_trees, "_initialize_tls", None)
    if initialize is not None:
        initialize(local)
        return
    # What older releases do at import, in the importing thread only.
    local.tree_manager_containers = {}
    local.tree_manager_locks = defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", local.tree_manager_locks)


def _allow_recompiles(shapes: int) -> None:
    """Let dynamo keep one compiled graph per bucket (its default limit is 8 per function)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(int(getattr(config, name)), shapes + 2))
