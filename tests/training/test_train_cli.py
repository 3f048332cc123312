"""``vvireid-train`` command line: eval report and pictures, data subcommands, user errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vvireid.model.checkpoint import save_checkpoint
from vvireid.model.config import ModelConfig
from vvireid.model.factory import create_model
from vvireid.training.cli import main


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    model = create_model(
        ModelConfig(
            "baseline", 4, backbone="vvireid-tiny", image_size=(64, 32), seq_len=4, num_cameras=2,
        ),
    )
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, {"data_format": "hitsz-vcm", "dataset": "hitsz-vcm", "epoch": 0})
    return path


def _pixels(path: Path, colour: tuple[int, int, int]) -> int:
    array = np.asarray(Image.open(path).convert("RGB"))
    return int((array == np.array(colour, dtype=np.uint8)).all(axis=2).sum())


def test_eval_cli_prints_report_and_draws_pictures(vcm, checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["eval", "--checkpoint", str(checkpoint), "--data-root", str(vcm), "--out", str(out),
               "--workers", "0", "--device", "cpu"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["directions"]) == {"ir_to_vis", "vis_to_ir"}
    for metrics in report["directions"].values():
        assert {"R1", "R5", "R10", "mAP", "mINP", "num_queries", "num_valid_queries"} <= set(metrics)
        assert 0 <= metrics["R1"] <= metrics["R5"] <= metrics["R10"] <= 100
        assert ("R20" in metrics) == (metrics["num_gallery"] >= 20)  # CMC stops at the gallery size
        assert metrics["num_queries"] > 0
    assert any("query's pid and camid" in note for note in report["protocol"])
    assert report["method"] == "baseline" and report["fingerprint"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["directions"] == report["directions"]
    cmc = Image.open(out / "cmc.png")
    assert cmc.format == "PNG" and cmc.size[0] >= 400
    ranklist = out / "ranklist.png"
    assert Image.open(ranklist).format == "PNG"
    # Correct matches have green borders, wrong ones red; an untrained model shows both.
    assert _pixels(ranklist, (0, 170, 0)) > 0 and _pixels(ranklist, (220, 0, 0)) > 0


def test_eval_cli_dense_and_default_out_folder(vcm, checkpoint, capsys):
    rc = main(["eval", "--checkpoint", str(checkpoint), "--data-root", str(vcm), "--dense",
               "--workers", "0", "--device", "cpu"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert any("dense" in note for note in report["protocol"])
    assert (checkpoint.parent / "eval" / "report.json").exists()


def test_data_subcommands_are_registered(vcm, capsys):
    assert main(["data", "check", "--format", "hitsz-vcm", str(vcm)]) == 0
    assert json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("argv, message", [
    (["fit", "--config", "smoke", "--data-root", "{missing}", "--out", "{tmp}/run"],
     "data root does not exist"),
    (["fit", "--config", "smoke", "--set", "data.seqlen=4", "--data-root", "{vcm}",
      "--out", "{tmp}/run"], "unknown key 'data.seqlen' (did you mean 'model.seq_len'?)"),
    (["fit", "--config", "no_such_recipe", "--data-root", "{vcm}", "--out", "{tmp}/run"],
     "no such file or shipped recipe"),
    (["fit", "--data-root", "{vcm}", "--out", "{tmp}/run"], "--config is required"),
    (["fit", "--resume", "--config", "smoke", "--data-root", "{vcm}", "--out", "{tmp}/run"],
     "no resume checkpoint"),
    (["eval", "--checkpoint", "{tmp}/garbage.safetensors", "--data-root", "{vcm}"],
     "not a readable vvireid checkpoint"),
    (["eval", "--checkpoint", "{tmp}/absent.safetensors", "--data-root", "{vcm}"],
     "no such checkpoint file"),
])
def test_user_errors_exit_2_with_one_clear_line(argv, message, vcm, tmp_path, capsys):
    (tmp_path / "garbage.safetensors").write_bytes(b"not a checkpoint at all")
    values = {"missing": str(tmp_path / "nowhere"), "tmp": str(tmp_path), "vcm": str(vcm)}
    rc = main([a.format(**values) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
