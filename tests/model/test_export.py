"""ONNX export: onnxruntime matches PyTorch, batch (and T where allowed) is dynamic, and the file
carries the preprocessing it needs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from vvireid.model.checkpoint import load_checkpoint, save_checkpoint
from vvireid.model.config import ModelConfig
from vvireid.model.export import export_onnx, main, parity
from vvireid.model.factory import create_model


def tiny_checkpoint(tmp_path, method: str, num_cameras: int = 0):
    model = create_model(ModelConfig(method, 5, backbone="vvireid-tiny", image_size=(64, 32),
                                     seq_len=4, num_cameras=num_cameras))
    path = tmp_path / f"{method}.safetensors"
    save_checkpoint(path, model)
    return path


def test_cli_exports_with_metadata_and_parity(tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path, "baseline")
    out = tmp_path / "model.onnx"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["max_abs_diff"] <= 1e-3 and summary["max_abs_diff_other_t"] <= 1e-3
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    model = load_checkpoint(checkpoint)
    assert props["fingerprint"] == model.fingerprint
    assert json.loads(props["image_size"]) == [64, 32] and props["seq_len"] == "4"
    assert json.loads(props["mean"]) == pytest.approx(list(model.preprocess.mean))
    assert json.loads(props["std"]) == pytest.approx(list(model.preprocess.std))
    assert props["similarity"] == model.similarity and props["dynamic_t"] == "true"


def test_dynamic_batch_and_frames_match_encode(tmp_path):
    model = load_checkpoint(tiny_checkpoint(tmp_path, "baseline"))
    export_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch, frames in ((1, 4), (5, 4), (3, 2)):
        clips = torch.randn(batch, frames, 3, 64, 32)
        got = session.run(["features"], {"clips": clips.numpy()})[0]
        with torch.no_grad():
            want = model._encode(clips, None)
            if model.similarity == "cosine":
                want = torch.nn.functional.normalize(want, dim=1)
        assert got.shape == (batch, model.embed_dim)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-3)


def test_camera_aware_model_takes_camids(tmp_path):
    model = load_checkpoint(tiny_checkpoint(tmp_path, "xreid", num_cameras=3))
    summary = export_onnx(model, tmp_path / "x.onnx")
    assert summary["inputs"] == ["clips", "camids"]
    assert json.loads(summary["metadata"]["inputs"]) == ["clips", "camids"]
    # The baseline ignores cameras: its graph has no camids input, and the metadata says so.
    blind = load_checkpoint(tiny_checkpoint(tmp_path, "baseline", num_cameras=3))
    summary = export_onnx(blind, tmp_path / "b.onnx")
    assert summary["inputs"] == json.loads(summary["metadata"]["inputs"]) == ["clips"]
    assert parity(model, tmp_path / "x.onnx") <= 1e-3
    assert parity(model, tmp_path / "x.onnx", frames=3) <= 1e-3


def test_vld_keeps_t_fixed(tmp_path):
    model = load_checkpoint(tiny_checkpoint(tmp_path, "vld"))
    summary = export_onnx(model, tmp_path / "v.onnx")
    assert summary["metadata"]["dynamic_t"] == "false"
    assert parity(model, tmp_path / "v.onnx", batch=2) <= 1e-3
    session = ort.InferenceSession(str(tmp_path / "v.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)dimension|shape|index"):
        session.run(["features"], {"clips": np.zeros((1, 3, 3, 64, 32), np.float32)})


def test_bad_checkpoint_is_one_error_line(tmp_path, capsys):
    (tmp_path / "x.safetensors").write_bytes(b"nope")
    assert main(["--checkpoint", str(tmp_path / "x.safetensors"), "--out",
                 str(tmp_path / "x.onnx")]) == 2
    assert "not a readable vvireid checkpoint" in capsys.readouterr().err
