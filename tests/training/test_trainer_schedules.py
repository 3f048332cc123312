"""The recipes' optimisers and learning-rate schedules against per-epoch tables of the official schedules.

Each test goes recipe YAML -> the method's real parameter groups (tiny backbone) -> optimiser ->
epoch schedule, so a wrong multiplier, optimiser, or schedule parameter in any layer fails here.
"""

import pytest
import torch
from vvireid.model.config import ModelConfig
from vvireid.model.factory import create_model
from vvireid.training.config import load_config
from vvireid.training.optim import (
    cosine_lr,
    create_optimizer,
    create_scheduler,
    warmup_multistep_lr,
)

TINY = ["model.backbone=vvireid-tiny", "model.image_size=[64, 32]", "model.pretrained=null"]

# VLD's official schedule (docs/fidelity.md V15), worked out by hand: epoch -> (base, 25x group).
VLD_TABLE = {
    0: (2.5e-7, 2.5e-7),
    1: (8.50e-6, 2.085e-4),
    2: (1.675e-5, 4.168e-4),
    3: (2.406e-5, 6.012e-4),
    6: (2.138e-5, 5.335e-4),
    12: (1.263e-5, 3.126e-4),
    18: (3.87e-6, 9.17e-5),
    23: (3.56e-7, 2.92e-6),
}
# X-ReID's WarmupMultiStepLR (docs/fidelity.md X19): 1-based epoch -> lr of the base group (5e-6).
XREID_TABLE = {1: 5e-7, 2: 9.5e-7, 5: 2.3e-6, 10: 4.55e-6, 11: 5e-6, 30: 5e-6, 31: 5e-7,
               50: 5e-7, 51: 5e-8, 60: 5e-8}


def _recipe_optimizer(name: str, method: str, seq_len: int):
    config = load_config(name, TINY)
    model = create_model(
        ModelConfig(
            method, 5, backbone="vvireid-tiny", image_size=(64, 32), seq_len=seq_len,
            num_cameras=3,
        ),
    )
    optimizer = create_optimizer(model, config.optim)
    return config, optimizer, create_scheduler(optimizer, config.optim)


@pytest.mark.parametrize("recipe", ["vld_hitsz_vcm", "vld_bupt", "baseline_hitsz_vcm"])
def test_vld_cosine_schedule_matches_reference_table(recipe):
    method = "baseline" if recipe.startswith("baseline") else "vld"
    config, optimizer, scheduler = _recipe_optimizer(recipe, method, 6)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {1e-4}
    assert sorted({g["initial_lr"] for g in optimizer.param_groups}) == [2.5e-5, 6.25e-4]
    assert config.optim.epochs * config.optim.iters_per_epoch == 4800
    for epoch, (base, fast) in VLD_TABLE.items():
        scheduler.set_epoch(epoch)
        lrs = {g["initial_lr"]: g["lr"] for g in optimizer.param_groups}
        assert lrs[2.5e-5] == pytest.approx(base, rel=2e-3), epoch
        assert lrs[6.25e-4] == pytest.approx(fast, rel=2e-3), epoch


def test_vld_warmup_is_linear_from_one_absolute_floor():
    """Warm-up start and floor are 0.01 * base lr for every group, the 25x group included."""
    for epoch in range(3):
        expected = 2.5e-7 + epoch * (6.25e-4 - 2.5e-7) / 3
        got = cosine_lr(epoch, 6.25e-4, t_initial=24, warmup_epochs=3, warmup_lr_init=2.5e-7,
                        lr_min=2.5e-7)
        assert got == pytest.approx(expected, rel=1e-12)
    after = cosine_lr(24, 6.25e-4, t_initial=24, warmup_epochs=3, warmup_lr_init=2.5e-7, lr_min=2.5e-7)
    assert after == 2.5e-7


@pytest.mark.parametrize("recipe", ["xreid_hitsz_vcm", "xreid_bupt"])
def test_xreid_warmup_multistep_matches_reference_table(recipe):
    config, optimizer, scheduler = _recipe_optimizer(recipe, "xreid", 10)
    assert type(optimizer) is torch.optim.Adam  # coupled L2, not AdamW
    assert {g["weight_decay"] for g in optimizer.param_groups} == {1e-4}
    assert config.optim.epochs == 60 and config.optim.iters_per_epoch == 300
    mults = sorted(g["initial_lr"] / 5e-6 for g in optimizer.param_groups)
    assert mults == pytest.approx([1, 2, 10, 20, 100])
    for epoch, lr in XREID_TABLE.items():
        scheduler.set_epoch(epoch - 1)
        for group in optimizer.param_groups:
            mult = group["initial_lr"] / 5e-6
            assert group["lr"] == pytest.approx(lr * mult, rel=1e-9), (epoch, mult)


def test_warmup_multistep_formula():
    kw = {"warmup_epochs": 10, "warmup_factor": 0.1, "milestones": (30, 50), "gamma": 0.1}
    assert warmup_multistep_lr(0, 1.0, **kw) == pytest.approx(0.1)
    assert warmup_multistep_lr(9, 1.0, **kw) == pytest.approx(0.91)
    assert warmup_multistep_lr(29, 1.0, **kw) == 1.0
    assert warmup_multistep_lr(30, 1.0, **kw) == pytest.approx(0.1)
    assert warmup_multistep_lr(50, 1.0, **kw) == pytest.approx(0.01)


def test_scheduler_state_round_trip():
    _, optimizer, scheduler = _recipe_optimizer("vld_hitsz_vcm", "vld", 6)
    scheduler.set_epoch(7)
    state = scheduler.state_dict()
    _, optimizer2, scheduler2 = _recipe_optimizer("vld_hitsz_vcm", "vld", 6)
    scheduler2.load_state_dict(state)
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in optimizer.param_groups]
