"""selfsup.config: numbers written as users write them, in --set and in YAML files."""
from __future__ import annotations

import pytest

from selfsup.config import ConfigError, load_config, parse_override


@pytest.mark.parametrize("text, value", [("optim.weight_decay=1e-5", 1e-5), ("optim.lr=5E-3", 5e-3),
                                         ("optim.lr=-2e+3", -2000.0), ("optim.lr=1.0e-5", 1e-5),
                                         ("train.epochs=8", 8), ("method.params.name=1e5x", "1e5x")])
def test_overrides_read_exponent_floats_as_numbers(text, value):
    key, got = parse_override(text)
    assert key == text.split("=")[0] and got == value and type(got) is type(value)


def test_a_yaml_recipe_with_exponent_floats_loads(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("method: {name: simclr}\noptim: {name: lars, lr: 1e-3, weight_decay: 1e-6}\n")
    cfg = load_config(path, {"optim.momentum": parse_override("optim.momentum=9e-1")[1]})
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum) == (1e-3, 1e-6, 0.9)


def test_a_string_where_a_number_belongs_is_still_an_error(tmp_path):
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(None, {"optim.lr": parse_override("optim.lr=fast")[1]})


def test_another_backbone_drops_the_recipes_backbone_params(tmp_path, caplog):
    """The recipe's backbone.params are its backbone's arguments: naming another backbone drops them (said in
    the log); params given as overrides still apply, and the same backbone keeps the recipe's."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("backbone:\n  name: small_resnet\n  params: {widths: [8, 16, 32, 64], stem_stride: 2}\n")
    with caplog.at_level("INFO", logger="selfsup"):
        cfg = load_config(recipe, {"backbone.name": "torchvision:resnet18"})
    assert cfg.backbone.name == "torchvision:resnet18" and cfg.backbone.params == {}
    assert "stem_stride, widths" in caplog.text
    cfg = load_config(recipe, {"backbone.name": "timm:resnet10t", "backbone.params.drop_path_rate": 0.1})
    assert cfg.backbone.params == {"drop_path_rate": 0.1}
    assert load_config(recipe, {"backbone.name": "small_resnet"}).backbone.params["widths"] == [8, 16, 32, 64]
