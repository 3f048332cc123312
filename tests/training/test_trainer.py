"""The trainer on CPU with the smoke recipe and synthetic data: every method trains, a killed run
resumes to the same weights, and failures (non-finite loss, full disk) keep the last checkpoint."""

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from vvireid.model.checkpoint import load_checkpoint, read_checkpoint_metadata
from vvireid.model.types import Modality
from vvireid.training.cli import main
from vvireid.training.config import load_config
from vvireid.training.evaluation import distance_matrix, evaluate
from vvireid.training.metrics_log import read_metrics
from vvireid.training.report import encode_tracklets
from vvireid.training.trainer import NonFiniteLossError, Trainer, TrainingError

SHORT = ["optim.epochs=2", "optim.iters_per_epoch=3", "optim.schedule.t_initial=2", "eval.every=1"]




def _fit(root: Path, out: Path, sets: list[str], **kw) -> dict:
    config = load_config("smoke", sets)
    return Trainer(config, root, out, device="cpu", **kw).fit()


def _train_records(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(run)
            if r["kind"] in ("train", "epoch", "eval") and "seconds" not in r]


def _mAP(model, tracklets, query: Modality, gallery: Modality) -> float:
    """mAP of ``query``-modality tracklets against ``gallery``-modality ones (VCM camera rule)."""
    feats = encode_tracklets(model, tracklets, model.preprocess, device=torch.device("cpu"))
    q = [i for i, t in enumerate(tracklets) if t.modality == query]
    g = [i for i, t in enumerate(tracklets) if t.modality == gallery]
    dist = distance_matrix(feats[q], feats[g], model.similarity)
    result = evaluate(dist, [tracklets[i].pid for i in q], [tracklets[i].pid for i in g],
                      [tracklets[i].camid for i in q], [tracklets[i].camid for i in g],
                      filter_same_camera=True)  # also removes a tracklet matched with itself
    return result.mAP


def _learning_metrics(trainer: Trainer) -> dict[str, float]:
    splits = trainer.splits
    test = splits.query["ir_to_vis"] + splits.gallery["ir_to_vis"]
    vis, ir = Modality.VISIBLE, Modality.INFRARED
    return {
        "cross_train": (_mAP(trainer.model, splits.train, ir, vis)
                        + _mAP(trainer.model, splits.train, vis, ir)) / 2,
        "same_heldout": (_mAP(trainer.model, test, ir, ir) + _mAP(trainer.model, test, vis, vis)) / 2,
        "cross_heldout": (_mAP(trainer.model, test, ir, vis) + _mAP(trainer.model, test, vis, ir)) / 2,
    }


def test_smoke_recipe_learns_a_cross_modal_feature_that_transfers(synth_dataset, tmp_path):
    """600 iterations of the smoke recipe (baseline, vvireid-demo backbone, 64x32) on 100 synthetic
    training identities; the feature must also match the 100 held-out identities across modalities.

    Measured (2-core CPU, ~45 s of training), untrained -> trained mAP: cross-modal on held-out
    identities 0.024 -> 0.076, same-modality on held-out 0.039 -> 0.273, cross-modal on training
    identities 0.021 -> 0.456.
    A plain random-init ViT (vvireid-tiny) stays at chance on held-out cross-modal matching with the
    same budget; the convolutional patch stem is what makes the smoke/demo models learn.
    """
    root = synth_dataset("vcm-learn", fmt="hitsz-vcm", ids=200, cameras=3, seed=0,
                          frames=(12, 14), image_size=(64, 32))
    trainer = Trainer(load_config("smoke"), root, tmp_path / "run", device="cpu")
    before = _learning_metrics(trainer)
    report = trainer.fit()
    after = _learning_metrics(trainer)
    assert after["cross_heldout"] >= before["cross_heldout"] + 0.03, (before, after)
    assert after["cross_heldout"] >= 2 * before["cross_heldout"], (before, after)
    assert after["cross_train"] >= before["cross_train"] + 0.3, (before, after)
    assert after["same_heldout"] >= before["same_heldout"] + 0.15, (before, after)
    assert report["directions"]["ir_to_vis"]["num_queries"] > 0
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if r["kind"] == "epoch"]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("method, terms", [
    ("vld", {"ce_cls", "ce_proj", "wrt_last", "wrt_cls", "wrt_proj", "v2t", "ce_sta", "wrt_sta"}),
    ("xreid", {"ce_clip", "tri_f", "tri_p", "cpcl_vis", "cpcl_ir", "ce_mii", "tri_o", "cmcl"}),
])
def test_each_method_trains_two_iterations(vcm, tmp_path, method, terms):
    run = tmp_path / method
    report = _fit(vcm, run, [f"model.method={method}", "optim.epochs=1", "optim.iters_per_epoch=2"])
    assert set(report["directions"]) == {"ir_to_vis", "vis_to_ir"}
    train = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == [0, 1]
    assert terms <= set(train[0]), sorted(train[0])
    model = load_checkpoint(run / "model.safetensors")
    assert model.config.method == method and model.config.num_classes == 4
    assert read_checkpoint_metadata(run / "model.safetensors")["extra"]["epoch"] == 1


def test_killed_run_resumes_to_the_same_weights(vcm, tmp_path, monkeypatch, capsys):
    sets = [*SHORT, "augment=vld"]  # random augmentation: the data RNG must be restored too
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _fit(vcm, whole, sets)

    original = Trainer.train_step

    def crash_in_epoch_2(self, batch, epoch, iteration):
        if epoch == 1 and iteration == 1:
            raise KeyboardInterrupt  # what Ctrl-C or a preempted job looks like
        return original(self, batch, epoch, iteration)

    monkeypatch.setattr(Trainer, "train_step", crash_in_epoch_2)
    args = ["fit", "--config", "smoke", "--data-root", str(vcm), "--out", str(killed),
            "--device", "cpu", *[x for s in sets for x in ("--set", s)]]
    assert main(args) == 130
    assert "--resume" in capsys.readouterr().err
    state = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and json.loads((killed / "run.json").read_text())["status"] == "failed"

    monkeypatch.setattr(Trainer, "train_step", original)
    assert main(["fit", "--out", str(killed), "--data-root", str(vcm), "--resume",
                 "--device", "cpu"]) == 0
    a, b = load_file(whole / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _train_records(whole) == _train_records(killed)  # resumed logs read like one run
    report_a = json.loads((whole / "report.json").read_text())
    report_b = json.loads((killed / "report.json").read_text())
    assert report_a["directions"] == report_b["directions"]
    info = json.loads((killed / "run.json").read_text())
    assert info["status"] == "finished" and info["sessions"][1]["resumed_at_epoch"] == 1
    assert (killed / "config.yaml").exists() and "git_sha" in info


def test_resume_refuses_another_config(vcm, tmp_path, capsys):
    run = tmp_path / "run"
    _fit(vcm, run, ["optim.epochs=1", "optim.iters_per_epoch=1"])
    rc = main(["fit", "--out", str(run), "--data-root", str(vcm), "--resume", "--device", "cpu",
               "--set", "optim.lr=0.5"])
    assert rc == 2
    assert "optim.lr (run: 0.001, now: 0.5)" in capsys.readouterr().err
    with pytest.raises(TrainingError, match="already holds a run"):
        _fit(vcm, run, ["optim.epochs=1"])


def test_non_finite_loss_stops_and_keeps_the_checkpoint(vcm, tmp_path, monkeypatch):
    from vvireid.training.objectives.vld import VLDObjective

    calls = {"n": 0}
    original = VLDObjective.__call__

    def poisoned(self, out, batch):
        terms = original(self, out, batch)
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2, iteration 2 (3 iterations per epoch)
            terms["wrt_cls"] = terms["wrt_cls"] * float("nan")
        return terms

    monkeypatch.setattr(VLDObjective, "__call__", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, iteration 2: term 'wrt_cls' is nan"):
        _fit(vcm, run, SHORT)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert read_checkpoint_metadata(run / "model.safetensors")["extra"]["epoch"] == 1


def test_full_disk_reports_clearly_and_keeps_the_previous_checkpoint(vcm, tmp_path, monkeypatch):
    import vvireid.training.trainer as trainer_module

    real_save = torch.save
    saves = {"n": 0}

    def save_until_full(obj, path, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            with open(path, "wb") as handle:  # a partial write, then the disk is full
                handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(trainer_module.torch, "save", save_until_full)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"disk full .* the checkpoint of epoch 1 is intact"):
        _fit(vcm, run, SHORT)
    monkeypatch.setattr(trainer_module.torch, "save", real_save)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]  # no temp left


def test_select_best_on_test_is_explicit_and_named(vcm, tmp_path):
    run = tmp_path / "run"
    report = _fit(vcm, run, SHORT, select_best_on_test=True)
    selection = report["selection"]
    assert selection["rule"] == "best_on_test" and "test set" in selection["note"]
    scores = [h["ir_to_vis/R1"] for h in report["history"]]
    best = max(range(len(scores)), key=lambda i: (scores[i], i)) + 1  # ties: the later epoch
    assert selection["epoch"] == best
    assert (run / "best.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    assert report["directions"]["ir_to_vis"]["R1"] == round(100 * scores[best - 1], 2)
    default = _fit(vcm, tmp_path / "default", SHORT)
    assert default["selection"]["rule"] == "final" and not (tmp_path / "default" / "best.safetensors").exists()


def test_select_best_on_test_follows_x_reid_official_rule(vcm, tmp_path):
    """X-ReID keeps the epoch maximising R1 + mAP of both directions, each the best of its four
    feature variants; the report gives that epoch's fixed feature and names the rule."""
    run = tmp_path / "xreid"
    report = _fit(vcm, run, [*SHORT, "model.method=xreid", "optim.epochs=3"],
                  select_best_on_test=True)
    selection = report["selection"]
    assert selection["metric"] == "sum_R1_mAP_best_variant" and "4 feature variants" in selection["note"]
    history = report["history"]
    variants = ("f", "f_o", "o")
    assert all(f"{d}/{v}/{m}" in h for h in history for d in ("ir_to_vis", "vis_to_ir")
               for v in variants for m in ("R1", "mAP"))

    def official(h):
        return sum(max([h[f"{d}/{m}"]] + [h[f"{d}/{v}/{m}"] for v in variants])
                   for d in ("ir_to_vis", "vis_to_ir") for m in ("R1", "mAP"))

    scores = [official(h) for h in history]
    best = max(range(len(scores)), key=lambda i: (scores[i], i)) + 1  # ties: the later epoch
    assert selection["epoch"] == best and selection["score"] == pytest.approx(scores[best - 1])
    assert report["directions"]["ir_to_vis"]["R1"] == round(100 * history[best - 1]["ir_to_vis/R1"], 2)


def test_bupt_aligned_pairs_train_and_evaluate_without_camera_filter(synth_dataset, tmp_path):
    root = synth_dataset("bupt-small", fmt="bupt", ids=8, cameras=2, seed=4,
                          frames=(8, 10), image_size=(64, 32))
    run = tmp_path / "bupt"
    report = _fit(root, run, ["data.format=bupt", "data.sampler=camera_pairs",
                              "data.train_sampling=random_sorted", "data.pair_flip=true",
                              "augment=vld", "optim.epochs=1", "optim.iters_per_epoch=2"])
    assert report["dataset"] == "bupt"
    assert any("none (BUPTCampus rule)" in note for note in report["protocol"])
    assert any("uniform" in note for note in report["protocol"])
    assert [r["iteration"] for r in read_metrics(run) if r["kind"] == "train"] == [0, 1]
    with pytest.raises(TrainingError, match="tracklets_per_id must be 2"):
        _fit(root, tmp_path / "bad", ["data.format=bupt", "data.sampler=camera_pairs",
                                      "data.tracklets_per_id=3"])
    twins = Trainer(load_config("smoke", ["data.format=bupt", "data.sampler=camera_pairs"]),
                    root, tmp_path / "twins", device="cpu")
    assert twins.train_set.aligned_pairs


def test_bupt_default_draw_is_independent_as_x_reid_official(synth_dataset, tmp_path):
    """The default sampler on an aligned dataset draws visible and infrared tracklets and their
    frames independently; the recipe's reader option is the one way to set drop_last_rgb_batch."""
    root = synth_dataset("bupt-small", fmt="bupt", ids=8, cameras=2, seed=4,
                          frames=(8, 10), image_size=(64, 32))
    trainer = Trainer(load_config("smoke", ["data.format=bupt",
                                            "data.options={drop_last_rgb_batch: true}"]),
                      root, tmp_path / "run", device="cpu")
    assert type(trainer.sampler).__name__ == "CrossModalityIdentitySampler"
    assert not trainer.train_set.aligned_pairs
    assert trainer.splits.extra["drop_last_rgb_batch"] is True
    recipe = load_config("xreid_bupt")
    assert recipe.data.sampler == "identity" and recipe.data.options == {"drop_last_rgb_batch": False}
    assert load_config("vld_bupt").data.sampler == "camera_pairs"
    with pytest.raises(ValueError, match="bupt_drop_last_rgb_batch"):
        load_config("smoke", ["data.bupt_drop_last_rgb_batch=true"])
