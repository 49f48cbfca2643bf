from dataclasses import dataclass, field

import pytest

from landscape.config import apply_overrides, config_hash, from_dict, load_yaml, parse_override, save_yaml, to_dict
from landscape.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)


def test_dataclass_yaml_round_trip(tmp_path):
    cfg = Outer(name="y", inner=Inner(lr=0.5))
    save_yaml(cfg, tmp_path / "c.yaml")
    back = from_dict(Outer, load_yaml(tmp_path / "c.yaml"))
    assert back.name == "y" and back.inner.lr == 0.5 and list(back.inner.betas) == [0.9, 0.999]
    assert config_hash(cfg) == config_hash(to_dict(back))


def test_unknown_field_is_refused_with_the_accepted_ones():
    with pytest.raises(ConfigError, match="Unknown config.inner field.*lrr.*accepted fields are betas, lr"):
        from_dict(Outer, {"inner": {"lrr": 1}})


def test_overrides_parse_values_and_nest():
    assert parse_override("inner.lr=1e-2") == ("inner.lr", 0.01)
    assert parse_override("name=abc") == ("name", "abc")
    out = apply_overrides({"inner": {"lr": 1}}, dict([parse_override("inner.lr=2"), parse_override("name=z")]))
    assert out == {"inner": {"lr": 2}, "name": "z"}
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_malformed_yaml_is_a_config_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")


def test_a_key_given_twice_is_refused_but_a_merge_may_be_overridden(tmp_path):
    # PyYAML keeps the last value of a key given twice: a recipe's typo went unnoticed
    (tmp_path / "twice.yaml").write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"the key 'lr' is given twice \(the second at line 3\); YAML would keep"):
        load_yaml(tmp_path / "twice.yaml")
    (tmp_path / "merge.yaml").write_text("base: &b {lr: 0.1, wd: 0.05}\noptim: {<<: *b, lr: 0.2}\n")
    assert load_yaml(tmp_path / "merge.yaml")["optim"] == {"lr": 0.2, "wd": 0.05}


def test_a_section_given_as_a_mapping_changes_only_the_keys_it_names():
    # --set 'augment={mixup: 0}' dropped the recipe's RandAugment, CutMix, random erasing and label smoothing
    from landscape.trainers import build_config

    def config(*overrides):
        return build_config("small-images", model="vit_pico_patch4_32", data="fashion-mnist", overrides=overrides)

    plain = config()
    assert plain.augment.auto_augment and plain.augment.cutmix > 0 and plain.schedule.warmup_epochs > 0
    for mapping, dotted in (("augment={mixup: 0.0}", ["augment.mixup=0.0"]),
                            ("schedule={min_lr: 1.0e-5, warmup_lr: 1.0e-6}",
                             ["schedule.min_lr=1.0e-5", "schedule.warmup_lr=1.0e-6"]),
                            ("model={kwargs: {depth: 2}}", ["model.kwargs.depth=2"])):
        assert config(mapping) == config(*dotted), mapping
    assert config("augment={mixup: 0.0}").augment.auto_augment == plain.augment.auto_augment
    assert apply_overrides({"a": {"b": 1, "c": {"d": 2, "e": 3}}}, {"a": {"c": {"d": 4}}}, merge=True) == \
        {"a": {"b": 1, "c": {"d": 4, "e": 3}}}
    assert apply_overrides({"a": {"b": 1}}, {"a": {"c": 2}}) == {"a": {"c": 2}}  # the config's own resets replace


def test_an_empty_mapping_empties_a_section_and_a_model_named_anyhow_drops_the_recipes_model_arguments():
    from landscape.trainers import build_config

    def model(*overrides, **options):
        config = build_config("digits", data="mnist", overrides=overrides, **options)
        return config.model.name, config.model.kwargs

    recipe_name, recipe_kwargs = model()
    assert recipe_kwargs  # the digits recipe's small ViT
    assert model("model.kwargs={}") == (recipe_name, {})  # it was merged as nothing: the recipe's stayed
    for named in (["model.name=vit_small_patch16_224"], ["model={name: vit_small_patch16_224}"]):
        # as --model does: the recipe's arguments were those of its own model (vit_small came out 32 wide)
        assert model(*named) == ("vit_small_patch16_224", {}) == model(model="vit_small_patch16_224")
    assert model("model={name: vit_small_patch16_224, kwargs: {depth: 2}}") == ("vit_small_patch16_224", {"depth": 2})
    assert model("model={drop_path: 0.1}") == (recipe_name, recipe_kwargs)


def test_an_empty_section_empties_the_recipes_values_not_the_options_given_beside_it():
    from landscape.trainers import build_config

    def config(*overrides, **given):
        return build_config("digits", overrides=overrides, **given)

    for lr in (config("optim={}", options={"lr": 0.01}), config("lr=0.01", "optim={}"), config("optim={}", "lr=0.01")):
        assert lr.optim.lr == 0.01
    assert config("optim={}").optim.lr != 0.01  # emptied: the default, not the recipe's
    assert config("model.kwargs={}", model_kwargs={"depth": 1}).model.kwargs == {"depth": 1}
    nested = config("model={kwargs: {}, drop_path: 0.1}", model_kwargs={"depth": 1})  # an empty one inside a mapping
    assert (nested.model.kwargs, nested.model.drop_path) == ({"depth": 1}, 0.1)
    assert config("data={}", data="synthetic").data.name == "synthetic"
