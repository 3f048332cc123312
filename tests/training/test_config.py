"""Training configs: shipped recipes carry the official values; loading is strict; --set works."""

import pytest
import yaml
from vvireid.training.config import (
    ConfigError,
    TrainConfig,
    available_configs,
    config_from_dict,
    load_config,
)

RECIPES = ["baseline_bupt", "baseline_hitsz_vcm", "demo", "smoke", "vld_bupt", "vld_hitsz_vcm",
           "xreid_bupt", "xreid_hitsz_vcm"]


def test_every_recipe_is_shipped_and_loads():
    assert sorted(available_configs()) == RECIPES
    for name in RECIPES:
        config = load_config(name)
        assert isinstance(config, TrainConfig)
        assert config.name == name


def test_vld_recipes_follow_the_official_code():
    vcm, bupt = load_config("vld_hitsz_vcm"), load_config("vld_bupt")
    for c in (vcm, bupt):
        assert (c.model.method, c.model.backbone, c.model.image_size, c.model.seq_len) == (
            "vld", "ViT-B-16", (288, 144), 6)
        assert (c.optim.optimizer, c.optim.lr, c.optim.weight_decay) == ("adamw", 2.5e-5, 1e-4)
        assert (c.optim.epochs, c.optim.iters_per_epoch) == (24, 200)
        s = c.optim.schedule
        assert (s.name, s.warmup_epochs, s.t_initial, s.min_lr_ratio, s.warmup_lr_ratio) == (
            "cosine", 3, 24, 0.01, 0.01)
        assert c.loss["v2t"] == 0.08 and c.loss["ce_sta"] == 0.4 and c.loss["wrt_sta"] == 1.0
        assert c.augment == "vld" and c.eval.every == 2
    assert (vcm.data.ids_per_batch, vcm.data.tracklets_per_id, vcm.data.train_sampling) == (
        4, 4, "rrs_train")
    assert (bupt.data.ids_per_batch, bupt.data.tracklets_per_id, bupt.data.train_sampling) == (
        8, 2, "random_sorted")
    assert bupt.data.pair_flip and not vcm.data.pair_flip


def test_xreid_recipes_follow_the_official_code_and_paper():
    for name in ("xreid_hitsz_vcm", "xreid_bupt"):
        c = load_config(name)
        assert (c.model.method, c.model.seq_len, c.model.image_size) == ("xreid", 10, (288, 144))
        assert (c.optim.optimizer, c.optim.lr, c.optim.weight_decay) == ("adam", 5e-6, 1e-4)
        assert (c.optim.epochs, c.optim.iters_per_epoch) == (60, 300)
        s = c.optim.schedule
        assert (s.name, s.warmup_epochs, s.warmup_factor, s.milestones, s.gamma) == (
            "warmup_multistep", 10, 0.1, (30, 50), 0.1)
        assert (c.data.ids_per_batch, c.data.tracklets_per_id) == (4, 2)
        assert c.loss["ce_clip"] == 0.25 and c.loss["tri_f"] == 1.0
        assert c.augment == "xreid" and c.precision == "fp32" and c.seed == 1234


def test_unknown_key_names_the_path_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.schedule.warmup_epoch' \(did you mean 'warmup_epochs'\?\)"):
        load_config("smoke", ["optim.schedule.warmup_epoch=2"])
    with pytest.raises(ConfigError, match=r"unknown key 'data.seqlen' \(did you mean 'model.seq_len'\?\)"):
        load_config("smoke", ["data.seqlen=4"])


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"model": {"methd": "vld"}}))
    with pytest.raises(ConfigError, match=r"mine.yaml: unknown key 'model.methd' \(did you mean 'method'\?\)"):
        load_config(str(path))


def test_set_overrides_are_dotted_and_yaml_typed():
    c = load_config("smoke", [
        "optim.lr=1e-5",                      # YAML 1.1 reads this as a string: still a float
        "optim.schedule.milestones=[3, 5]",
        "model.options.use_sth=false",        # a free-form section gets new keys
        "data.test_sampling=null",
        "eval.dense=true",
        "loss.ce_cls=0.5",
        "name=renamed",
    ])
    assert c.optim.lr == 1e-5 and isinstance(c.optim.lr, float)
    assert c.optim.schedule.milestones == (3, 5)
    assert c.model.options == {"use_sth": False}
    assert c.data.test_sampling is None and c.eval.dense is True
    assert c.loss == {"ce_cls": 0.5} and c.name == "renamed"


@pytest.mark.parametrize("override, message", [
    ("optim.epochs=two", r"optim.epochs: expected an integer, got 'two'"),
    ("eval.dense=1", r"eval.dense: expected true or false"),
    ("optim.optimizer=adamx", r"optim.optimizer: 'adamx' is not one of .* \(did you mean 'adam'"),
    ("optim.lr=-1", r"optim.lr: must be > 0"),
    ("optim.lr", r"expected key.path=value"),
    ("optim.lr.x=1", r"optim.lr is a value, not a section"),
    ("data.train_sampling=dense", r"data.train_sampling: 'dense' is not one of"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", [override])


def test_unknown_recipe_suggests_a_shipped_one():
    with pytest.raises(ConfigError, match=r"'vld_hitsz_vc'.*did you mean 'vld_hitsz_vcm'"):
        load_config("vld_hitsz_vc")


def test_resolved_config_round_trips_through_yaml():
    c = load_config("xreid_bupt", ["optim.epochs=3"])
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(c.to_dict())))
    assert again == c
