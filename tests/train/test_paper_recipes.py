"""Defaults that fit the named backbone when no tuned recipe exists: image size, patch, local crops and the
method's paper optimiser for that backbone family; the user's own settings always win."""
from __future__ import annotations

import yaml
from PIL import Image

from selfsup.cli import main
from selfsup.config import load_config
from selfsup.train.paper_recipes import backbone_defaults, is_vit_name, native_image_size, step_cost_line


def test_a_timm_vit_for_dino_on_a_folder_gets_its_size_patch_multiple_crops_and_the_vit_recipe(tmp_path):
    got, lines = backbone_defaults({"method.name": "dino", "data.name": str(tmp_path),
                                    "backbone.name": "timm:vit_small_patch16_224", "train.epochs": 100})
    assert got["data.image_size"] == 224 and got["views.local_size"] == 96  # 96/224 of 224, a multiple of 16
    assert got["optim.name"] == "adamw" and got["optim.lr"] == 5e-4 and got["optim.weight_decay_end"] == 0.4
    assert got["optim.warmup_epochs"] == 10  # the paper's 10 of 100 epochs
    assert any("2104.14294" in line for line in lines) and len(lines) == 3


def test_the_users_settings_win_and_named_datasets_keep_their_size():
    got, _ = backbone_defaults({"method.name": "dino", "data.name": "fashion-mnist", "optim.lr": 0.1,
                                "backbone.name": "timm:vit_small_patch16_224"})
    assert "data.image_size" not in got and not any(k.startswith("optim.") for k in got)
    got, _ = backbone_defaults({"method.name": "simclr", "data.name": "/some/folder", "data.image_size": 96,
                                "backbone.name": "torchvision:resnet50"})
    assert "data.image_size" not in got and got["optim.name"] == "lars" and got["optim.weight_decay"] == 1e-6


def test_selfsup_vits_get_a_patch_and_unknown_recipes_say_so():
    got, lines = backbone_defaults({"method.name": "mae", "data.name": "/f", "data.image_size": 128,
                                    "backbone.name": "vit_small"})
    assert got["backbone.params.patch_size"] == 8 and got["optim.betas"] == [0.9, 0.95]
    got, lines = backbone_defaults({"method.name": "rotation", "data.name": "/f", "backbone.name": "resnet18"})
    assert got == {} and "library defaults" in lines[0]
    assert backbone_defaults({"method.name": "dino", "backbone.name": "auto"}) == ({}, [])
    assert is_vit_name("timm:deit_small_patch16_224") and is_vit_name("vit_tiny") and not is_vit_name("timm:resnet50")
    assert native_image_size("timm:efficientnet_b3") == 288 and native_image_size("resnet18") is None


def test_the_cli_resolves_them_and_prints_the_cost_of_a_step(tmp_path, capsys):
    for i in range(4):
        Image.new("RGB", (300, 200), (i * 40, 90, 200)).save(tmp_path / f"p{i}.webp")
    assert main(["pretrain", "--method", "dino", "--data", str(tmp_path), "--backbone", "timm:vit_small_patch16_224",
                 "--print-config"]) == 0
    out = capsys.readouterr()
    cfg = yaml.safe_load(out.out)
    assert cfg["data"]["image_size"] == 224 and cfg["views"]["local_size"] == 96 and cfg["optim"]["name"] == "adamw"
    assert "recipe: optimiser: dino's ViT recipe" in out.err
    cfg = load_config(None, {"method.name": "simclr", "data.image_size": 32, "train.batch_size": 8,
                             "backbone.name": "small_resnet"})
    line = step_cost_line(cfg, in_chans=3)
    assert line.startswith("cost: ≈ ") and "TFLOP per step of batch 8" in line and "GFLOP/s" in line
