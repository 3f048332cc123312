"""Score calibration: the logistic fit on synthetic scores, its file, and ``vvireid-train calibrate``."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vvireid.indexer.calibration import (
    Calibration,
    CalibrationError,
    calibration_path,
    cross_modal_pair_scores,
    find_calibration,
    fit_logistic,
)
from vvireid.model.checkpoint import save_checkpoint
from vvireid.model.config import ModelConfig
from vvireid.model.factory import create_model
from vvireid.training.cli import main


def test_fit_recovers_a_known_logistic_and_is_monotone():
    """Labels drawn from p = sigmoid(8 s - 4) with s uniform: the fit must find (8, -4)."""
    rng = np.random.default_rng(0)
    scores = rng.uniform(-0.5, 1.5, 40_000)
    labels = rng.random(len(scores)) < 1 / (1 + np.exp(-(8 * scores - 4)))
    pos, neg = scores[labels], scores[~labels]
    prior = len(pos) / len(scores)  # the sample's own prior: the unweighted maximum likelihood
    slope, intercept = fit_logistic(pos, neg, prior=prior)
    assert slope == pytest.approx(8, rel=0.05) and intercept == pytest.approx(-4, rel=0.05)
    cal = Calibration(slope, intercept)
    grid = np.linspace(-2, 2, 101)
    assert (np.diff(cal.probability(grid)) > 0).all()
    assert cal.probability(cal.score_for(0.9)) == pytest.approx(0.9)


def test_balanced_fit_orders_the_two_distributions():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(0.7, 0.1, 300), rng.normal(0.2, 0.1, 30_000)
    cal = Calibration(*fit_logistic(pos, neg))
    assert cal.probability(pos).mean() > 0.9 > 0.1 > cal.probability(neg).mean()
    assert 0.4 < cal.score_for(0.5) < 0.5  # even odds: half-way between the two means
    assert cal.probability(0.45) == pytest.approx(0.5, abs=0.1)


def test_fit_refuses_unusable_scores():
    with pytest.raises(CalibrationError, match="do not score higher"):
        fit_logistic([0.1, 0.2, 0.15], [0.6, 0.7, 0.65])
    with pytest.raises(CalibrationError, match="same- and different-identity"):
        fit_logistic([], [0.1])


def test_pairs_are_cross_modal_only():
    feats = np.eye(4)[[0, 0, 1, 1, 0]]
    pos, neg = cross_modal_pair_scores(feats, [0, 0, 1, 1, 1], [0, 1, 0, 1, 1], "cosine")
    # visible rows 0, 2; infrared rows 1, 3, 4 -> 6 pairs, pid-equal: (0,1), (2,3), (2,4)
    assert sorted(pos.tolist()) == [0.0, 1.0, 1.0] and sorted(neg.tolist()) == [0.0, 0.0, 1.0]


def test_file_round_trip_and_fingerprint_check(tmp_path):
    cal = Calibration(5.0, -2.0, fingerprint="abc", stats={"positives": 3})
    path = calibration_path(tmp_path / "m.safetensors")
    assert path.name == "m.safetensors.calibration.json"
    cal.save(path)
    assert Calibration.load(path, "abc") == cal
    with pytest.raises(CalibrationError, match="fitted for model abc"):
        Calibration.load(path, "other")
    path.write_text(json.dumps({**cal.to_dict(), "slope": -1}))
    with pytest.raises(CalibrationError, match="slope must be"):
        Calibration.load(path)
    assert find_calibration(tmp_path / "none.safetensors", "abc") is None


def labelled_manifest(root: Path, pids: int = 6) -> Path:
    """Each identity a block pattern; its infrared tracklet is the grayscale of the visible one,
    so even a random-weight model scores same-identity cross-modal pairs higher."""
    records = []
    for pid in range(pids):
        base = np.random.default_rng(pid).integers(0, 256, size=(4, 2, 3))
        for modality, camid in (("visible", 0), ("infrared", 1)):
            folder = root / f"{pid}-{modality}"
            folder.mkdir(parents=True)
            frames = []
            for f in range(4):
                noise = np.random.default_rng(100 * pid + 10 * camid + f).normal(0, 8, (64, 32, 3))
                pixels = np.clip(np.kron(base, np.ones((16, 16, 1))) + noise, 0, 255)
                image = Image.fromarray(pixels.astype(np.uint8))
                (image.convert("L") if camid else image).save(folder / f"{f}.png")
                frames.append(f"{pid}-{modality}/{f}.png")
            records.append({"tracklet_id": f"{pid}-{modality}", "modality": modality,
                            "camid": camid, "pid": pid, "frames": frames,
                            "split": "query" if camid else "gallery"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


def test_calibrate_cli_writes_json_and_histogram(tmp_path, capsys):
    manifest = labelled_manifest(tmp_path / "data")
    model = create_model(ModelConfig("baseline", 4, backbone="vvireid-tiny", image_size=(64, 32),
                                     seq_len=4, num_cameras=2))
    checkpoint = tmp_path / "model.safetensors"
    save_checkpoint(checkpoint, model)
    rc = main(["calibrate", "--checkpoint", str(checkpoint), "--data-root", str(manifest),
               "--format", "manifest", "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    summary = json.loads(out.out)
    assert Path(summary["calibration"]) == calibration_path(checkpoint)
    cal = Calibration.load(summary["calibration"], model.fingerprint)
    assert cal.stats["positives"] > 0 and cal.stats["negatives"] > cal.stats["positives"]
    assert cal.stats["positive_mean"] > cal.stats["negative_mean"]
    picture = Image.open(summary["histogram"])
    assert picture.format == "PNG"
    pixels = np.asarray(picture.convert("RGB"))
    for colour in ((44, 160, 44), (214, 39, 40)):  # both histograms are drawn
        assert (pixels == np.array(colour, dtype=np.uint8)).all(axis=2).any()


def test_calibrate_cli_without_format_says_so(vcm, tmp_path, capsys):
    model = create_model(ModelConfig("baseline", 4, backbone="vvireid-tiny", image_size=(64, 32),
                                     seq_len=4, num_cameras=2))
    checkpoint = tmp_path / "model.safetensors"
    save_checkpoint(checkpoint, model)
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data-root", str(vcm)]) == 2
    assert "pass --format" in capsys.readouterr().err
