"""``vvireid-export``: a checkpoint -> an ONNX model that needs nothing from vvireid to run.

The graph maps normalised clips ``[B, T, 3, H, W]`` (and, for camera-aware models, camids ``[B]``)
to retrieval features ``[B, D]``, L2-normalised when the model ranks by cosine, i.e. exactly what
``ReIDModel.encode`` returns. Batch is dynamic; T is dynamic too unless the method's layers are
sized by the sequence length (VLD's spatial-temporal hub). Everything a caller needs to feed it
(mean, std, image size, seq_len, frame sampling, similarity) and the checkpoint's fingerprint are
written into the file's ``metadata_props``, so a deployment cannot pair it with the wrong
preprocessing or mix its vectors with another model's gallery.

A parity check runs onnxruntime and PyTorch on the same random clips and reports the largest
absolute difference (the CLI prints it and fails above ``--tolerance``).

TensorRT is a next step from this file (see README "Export")::

    trtexec --onnx=model.onnx --saveEngine=model.plan --fp16 \\
        --minShapes=clips:1x6x3x288x144 --optShapes=clips:32x6x3x288x144 \\
        --maxShapes=clips:128x6x3x288x144
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from vvireid.model.base import ReIDModel
from vvireid.model.checkpoint import CheckpointError, load_checkpoint
from vvireid.model.fileio import write_bytes_atomic

log = logging.getLogger(__name__)

OPSET = 17
DEFAULT_TOLERANCE = 1e-3


class _Encoder(nn.Module):
    """``ReIDModel.encode`` without the Python-side shape check, for tracing."""

    def __init__(self, model: ReIDModel, with_camids: bool) -> None:
        super().__init__()
        self.model = model
        self.with_camids = with_camids

    def forward(self, clips: torch.Tensor, camids: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.model._encode(clips, camids if self.with_camids else None)
        if self.model.similarity == "cosine":
            feats = nn.functional.normalize(feats, dim=1)
        return feats


def dynamic_time(model: ReIDModel) -> bool:
    """Whether the model accepts any clip length T (False when a layer is sized by seq_len)."""
    return getattr(model, "hub", None) is None


def metadata(model: ReIDModel, *, with_camids: bool, dynamic_t: bool) -> dict[str, str]:
    """The ``metadata_props`` of the exported file (all values are strings, JSON where needed)."""
    pre = model.preprocess
    return {
        "vvireid.format": "vvireid.onnx",
        "method": model.config.method,
        "fingerprint": str(model.fingerprint),
        "similarity": model.similarity,
        "normalized": json.dumps(model.similarity == "cosine"),
        "image_size": json.dumps(list(pre.image_size)),
        "mean": json.dumps(list(pre.mean)),
        "std": json.dumps(list(pre.std)),
        "seq_len": str(pre.seq_len),
        "test_sampling": pre.test_sampling,
        "dynamic_t": json.dumps(dynamic_t),
        "inputs": json.dumps(["clips", "camids"] if with_camids else ["clips"]),
        "layout": "clips [B, T, 3, H, W] float32, RGB, resized bilinear to image_size, "
        "scaled to [0, 1], then (x - mean) / std; output features [B, D] float32",
    }


def export_onnx(model: ReIDModel, out: str | Path, *, batch: int = 2) -> dict[str, Any]:
    """Write ``model`` as ONNX at ``out`` (atomically); returns a summary with the metadata.

    Raises:
        RuntimeError: the exporter fails (the message names the model's method).
    """
    import onnx

    model = model.cpu().eval()
    height, width = model.config.image_size
    with_camids = model.config.num_cameras > 0
    dynamic_t = dynamic_time(model)
    clips = torch.randn(batch, model.seq_len, 3, height, width)
    camids = torch.zeros(batch, dtype=torch.int64)
    args: tuple[torch.Tensor, ...] = (clips, camids) if with_camids else (clips,)
    names = ["clips", "camids"] if with_camids else ["clips"]
    axes: dict[str, dict[int, str]] = {"clips": {0: "batch", 1: "frames"} if dynamic_t else
                                       {0: "batch"}, "features": {0: "batch"}}
    if with_camids:
        axes["camids"] = {0: "batch"}
    tmp = Path(str(out) + ".export.tmp")
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's eval fast path is a fused op that ONNX has no symbol for.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Shape checks inside the models trace as constants: expected, not a problem.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # TorchScript exporter on purpose: torch.export (dynamo=True) refuses X-ReID's
            # data-dependent camid checks and takes 17 s instead of 1.5 s on the tiny baseline.
            warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX",
                                    DeprecationWarning)
            torch.onnx.export(_Encoder(model, with_camids), args, str(tmp), input_names=names,
                              output_names=["features"], dynamic_axes=axes, opset_version=OPSET,
                              dynamo=False)
        proto = onnx.load(str(tmp))
    except Exception as exc:  # the exporters raise many types; the caller needs one message
        raise RuntimeError(f"ONNX export of the {model.config.method} model failed: {exc}") from exc
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        tmp.unlink(missing_ok=True)
    # The exporter drops an input the graph never reads (camids of the camera-blind baseline).
    graph_inputs = [i.name for i in proto.graph.input]
    props = metadata(model, with_camids="camids" in graph_inputs, dynamic_t=dynamic_t)
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto)
    write_bytes_atomic(Path(out), proto.SerializeToString())
    log.info("exported %s to %s (inputs %s)", model.config.method, out, graph_inputs)
    return {"onnx": str(out), "inputs": graph_inputs, "metadata": props}


def parity(model: ReIDModel, onnx_path: str | Path, *, batch: int = 3, frames: int | None = None,
           seed: int = 0) -> float:
    """Max |onnxruntime - PyTorch| over the features of the same random clips (CPU, fp32).

    ``frames`` (default: the model's seq_len) checks a dynamic T.
    """
    import onnxruntime as ort

    model = model.cpu().eval()
    height, width = model.config.image_size
    generator = torch.Generator().manual_seed(seed)
    clips = torch.randn(batch, frames or model.seq_len, 3, height, width, generator=generator)
    camids = torch.randint(0, max(model.config.num_cameras, 1), (batch,), generator=generator)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {"clips": clips.numpy(), "camids": camids.numpy()}
    wanted = {i.name for i in session.get_inputs()}
    outputs = session.run(["features"], {k: v for k, v in feeds.items() if k in wanted})[0]
    with torch.no_grad():
        reference = _Encoder(model, model.config.num_cameras > 0)(clips, camids).numpy()
    return float(np.abs(outputs - reference).max())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vvireid-export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="model.safetensors")
    parser.add_argument("--out", required=True, help="ONNX file to write")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest max-abs difference the parity check accepts (default 1e-3)")
    parser.add_argument("--skip-parity", action="store_true", help="do not run onnxruntime")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vvireid-export``: export, check parity, print a JSON summary."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        model = load_checkpoint(args.checkpoint)
        summary = export_onnx(model, args.out)
        if not args.skip_parity:
            summary["max_abs_diff"] = parity(model, args.out)
            if dynamic_time(model) and model.seq_len > 1:
                summary["max_abs_diff_other_t"] = parity(model, args.out, frames=model.seq_len - 1)
    except ModuleNotFoundError as exc:
        sys.stderr.write(f"error: vvireid-export needs the export dependencies (module {exc.name} "
                         "is missing): pip install 'vvireid[export]'\n")
        return 2
    except (CheckpointError, RuntimeError, OSError, ImportError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    worst = max(summary.get("max_abs_diff", 0.0), summary.get("max_abs_diff_other_t", 0.0))
    if worst > args.tolerance:
        sys.stderr.write(f"error: onnxruntime differs from PyTorch by {worst:.2e} "
                         f"(> {args.tolerance:.0e})\n")
        return 1
    log.info("parity: max abs diff %.2e", worst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
