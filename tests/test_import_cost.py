"""Importing selfsup (what every command does first) must not import timm or torchvision: together they
cost ~2 s of CPU (timm pulls in torchvision.ops and torch._dynamo). They load when a ViT or a
torchvision:/timm: backbone is built."""
import subprocess
import sys


def test_import_selfsup_leaves_timm_and_torchvision_unloaded():
    code = ("import sys, selfsup, selfsup.cli, selfsup.methods; "
            "print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_building_a_vit_loads_timm_on_demand():
    code = ("import sys; from selfsup.nn import build_backbone; from selfsup.nn.vit import is_vit, require_vit; "
            "b = build_backbone('vit_tiny', 1, 28, depth=1); "
            "print('timm' in sys.modules, is_vit(b), require_vit(b, 'mae') is b)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True"]
