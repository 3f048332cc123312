"""The training speed paths change no number: fused optimiser, sync-free NaN checks, cut prompts."""

from __future__ import annotations

import functools

import pytest
import torch
from vvireid.model.config import ModelConfig
from vvireid.model.factory import create_model
from vvireid.training.config import OptimSection, load_config
from vvireid.training.optim import can_fuse, create_optimizer, is_fused
from vvireid.training.trainer import NonFiniteLossError, Trainer, _NanWatch


def _vld(tiny_kwargs: dict) -> torch.nn.Module:
    return create_model(ModelConfig("vld", 6, seq_len=4, **tiny_kwargs))


def test_fused_adamw_is_the_cuda_default_only(tiny_kwargs):
    model = _vld(tiny_kwargs)
    assert not can_fuse(model.parameters())  # CPU tensors: the multi-tensor path
    assert not is_fused(create_optimizer(model, OptimSection()))
    assert is_fused(create_optimizer(model, OptimSection(), fused=True))
    assert not is_fused(create_optimizer(model, OptimSection(optimizer="sgd")))


def test_a_non_finite_step_updates_nothing_and_is_reported_later():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    watch = _NanWatch(["loss", "a"], weight.device)
    steps = [(0, 0, 1.0), (0, 1, float("nan")), (0, 2, 1.0)]  # a finite step after the bad one
    after_first = None
    for epoch, iteration, value in steps:
        watch.record(torch.tensor([value, value]), (epoch, iteration))
        optimizer.found_inf = watch.seen.float()
        weight.grad = torch.ones(3)
        optimizer.step()
        after_first = weight.detach().clone() if after_first is None else after_first
    torch.testing.assert_close(weight.detach(), after_first, rtol=0, atol=0)  # sticky skip
    where, values = watch.first_bad()
    assert where == (0, 1) and all(v != v for v in values)


def test_a_clean_read_forgets_the_steps_it_covered():
    watch = _NanWatch(["loss"], torch.device("cpu"))
    for i in range(3):
        watch.record(torch.tensor([1.0]), (0, i))
    assert watch.first_bad() is None and watch._steps == []
    watch.record(torch.tensor([float("inf")]), (1, 7))
    assert watch.first_bad()[0] == (1, 7)


@pytest.mark.slow
def test_sync_free_path_stops_at_the_bad_step_with_the_checkpoint_intact(vcm, tmp_path,
                                                                          monkeypatch):
    import vvireid.training.trainer as trainer_module
    from vvireid.training.objectives.vld import VLDObjective

    monkeypatch.setattr(trainer_module, "create_optimizer",
                        functools.partial(create_optimizer, fused=True))
    calls: dict = {"n": 0}
    original = VLDObjective.__call__

    def poisoned(self, out, batch):
        terms = original(self, out, batch)
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2, iteration 2 (3 iterations per epoch)
            terms["wrt_cls"] = terms["wrt_cls"] * float("nan")
            calls["weights"] = {k: v.detach().clone() for k, v in calls["model"].named_parameters()}
        return terms

    monkeypatch.setattr(VLDObjective, "__call__", poisoned)
    config = load_config("smoke", ["optim.epochs=2", "optim.iters_per_epoch=3",
                                   "optim.schedule.t_initial=2", "eval.every=1", "log_every=100"])
    trainer = Trainer(config, vcm, tmp_path / "run", device="cpu")
    calls["model"] = trainer.model
    assert trainer._sync_free
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, iteration 2: term 'wrt_cls' is nan"):
        trainer.fit()
    assert calls["n"] == 6  # the run went on to the end of the epoch, updating nothing
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    for name, param in trainer.model.named_parameters():  # no update from the bad step on
        assert torch.equal(param.detach(), calls["weights"][name]), name


def test_prompts_cut_after_eot_give_the_same_features_and_gradients(tiny_kwargs):
    model = _vld(tiny_kwargs)
    prompts, text = model.prompts, model.backbone.text
    eot = torch.full((prompts.num_classes,), prompts.eot_index)
    full = text.encode_embeddings(prompts.embeddings(text), eot)
    (grad_full,) = torch.autograd.grad(full.square().sum(), prompts.cls_ctx)
    cut = prompts(text)
    (grad_cut,) = torch.autograd.grad(cut.square().sum(), prompts.cls_ctx)
    assert prompts.eot_index + 1 < text.positional_embedding.shape[0]  # really shorter
    torch.testing.assert_close(cut, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_cut, grad_full, rtol=1e-5, atol=1e-6)
