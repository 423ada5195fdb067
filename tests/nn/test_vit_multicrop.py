"""The ViT on inputs other than its training size (multi-crop's local crops, issue #19): positions for the new
grid, their cache, the masked-token path, and clear errors when the patch size does not divide the input."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import TINY_BACKBONES
from selfsup.config import ConfigError, load_config
from selfsup.nn.backbones import build_backbone
from selfsup.nn.vit import sincos_pos_embed_2d
from selfsup.nn.vit_model import ViT


def tiny_vit(size: int = 28, **kw) -> ViT:
    return build_backbone("vit_tiny", 1, size, **{**TINY_BACKBONES["vit_tiny"], **kw})


@pytest.mark.parametrize("registers", [0, 2])
def test_other_sizes_encode_with_their_own_grid(registers):
    vit = tiny_vit(registers=registers).eval()
    for size, grid in ((28, (7, 7)), (12, (3, 3)), (16, (4, 4)), (4, (1, 1))):
        x = torch.randn(2, 1, size, size)
        assert vit.patch_grid(x) == grid
        assert vit.patch_tokens(x).shape == (2, grid[0] * grid[1], 48)
        assert vit(x).shape == (2, 48)
    # non-square inputs have their own (h, w) grid
    assert vit.patch_tokens(torch.randn(1, 1, 12, 20)).shape == (1, 15, 48)


def test_training_grid_keeps_its_stored_positions():
    vit = tiny_vit()
    pos = vit.pos_embed_for((7, 7))
    assert pos.data_ptr() == vit.pos_embed[:, 1:].data_ptr()
    torch.testing.assert_close(pos[0], sincos_pos_embed_2d(48, 7))


def test_local_grid_positions_span_the_training_grid():
    """A g×g grid gets the sin-cos embedding at the positions F.interpolate (align_corners=False) resamples a
    7×7 grid to: cell i at (i + ½)·7/g − ½; DINO's interpolate_pos_encoding, computed exactly."""
    vit = tiny_vit()
    pos = vit.pos_embed_for((3, 3))[0]  # (9, D)
    centres = [(i + 0.5) * 7 / 3 - 0.5 for i in range(3)]
    assert centres == pytest.approx([2 / 3, 3.0, 16 / 3])
    # the middle cell sits exactly on the training grid's middle cell (3, 3)
    torch.testing.assert_close(pos[4], sincos_pos_embed_2d(48, 7)[3 * 7 + 3])
    # the sin-cos embedding of row position r, column position c, against a direct evaluation
    dim = 48 // 2
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    r, c = centres[0], centres[2]
    direct = torch.cat([torch.sin(r * omega), torch.cos(r * omega), torch.sin(c * omega), torch.cos(c * omega)]).float()
    torch.testing.assert_close(pos[0 * 3 + 2], direct)
    # a grid the size of the training one is the training one
    torch.testing.assert_close(sincos_pos_embed_2d(48, 7, extent=7), sincos_pos_embed_2d(48, 7))


def test_positions_are_cached_per_grid_and_dtype():
    vit = tiny_vit()
    a = vit.pos_embed_for((3, 3))
    assert vit.pos_embed_for((3, 3)) is a  # computed once
    assert vit.pos_embed_for((4, 4)) is not a and len(vit.pos_cache) == 2
    vit.double()
    assert vit.pos_embed_for((3, 3)).dtype == torch.float64  # a new entry for the new dtype
    assert not vit.pos_embed_for((3, 3)).requires_grad  # fixed: nothing to learn
    assert "pos_cache" not in " ".join(vit.state_dict())  # never saved


def test_mask_tokens_at_another_size():
    vit = tiny_vit().eval()
    x = torch.randn(2, 1, 12, 12)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    token = torch.randn(48)
    torch.testing.assert_close(vit.encode_with_mask_tokens(x, mask, token), vit.encode(vit.patch_tokens(x)))
    with pytest.raises(ValueError, match=r"\(B, L\) = \(2, 9\)"):
        vit.encode_with_mask_tokens(x, torch.zeros(2, 49, dtype=torch.bool), token)


def test_a_size_the_patch_does_not_divide_is_a_clear_error():
    vit = tiny_vit()
    with pytest.raises(ValueError, match="14×14 input is not divisible by the patch size 4"):
        vit(torch.randn(1, 1, 14, 14))
    assert vit.input_problem(12) is None and vit.input_problem(28) is None
    assert "views.local_size=12" in vit.input_problem(14)
    assert "not divisible" in vit.input_problem(2)


def test_dino_multicrop_on_our_vit_trains():
    """DINO with local crops on vit_tiny used to stop at timm's raw AssertionError on the local crops' size."""
    from selfsup.methods.base import make_progress
    from selfsup.methods.dino import DINO
    from selfsup.views import make_views, resolve_sizes

    method = DINO(tiny_vit(), out_dim=32, hidden=16, bottleneck=8, freeze_last_layer_epochs=0)
    recipe = resolve_sizes(DINO.spec.views, 28)
    assert recipe.local.size == 12 and recipe.local_crops == 8
    views = make_views(torch.randint(0, 255, (4, 1, 28, 28), dtype=torch.uint8), recipe, [0.5], [0.25])
    loss, _ = method.training_step(views, make_progress(method, 0, 10, 0, 10))
    assert math.isfinite(float(loss.detach()))
    loss.backward()
    assert method.backbone.cls_token.grad is not None


@pytest.mark.parametrize("method", ["dino", "ibot", "dinov2"])
def test_local_crops_the_patch_does_not_divide_fail_before_training(method):
    """The run checks ask the ViT about every view size: a 14-px local crop on patch 4 is refused with the
    setting to change, before any step (``selfsup.train.build.check_run``)."""
    from selfsup.methods import get_method
    from selfsup.train.build import build_method, check_run, view_recipe

    cfg = load_config(None, {"method.name": method, "backbone.name": "vit_tiny", "backbone.depth": 1,
                             "backbone.embed_dim": 48, "backbone.num_heads": 3, "views.local_crops": 2,
                             "views.local_size": 14, "method.out_dim": 32, "method.hidden": 16,
                             "method.bottleneck": 8})
    if method == "dinov2":
        cfg.method.params["patch_out_dim"] = 32
    model = build_method(cfg, 1, 28)
    recipe = view_recipe(cfg, get_method(method).spec, 28)
    with pytest.raises(ConfigError, match="14px view is not divisible by the ViT patch size 4"):
        check_run(model, cfg, 1000, recipe)
    cfg.views["local_size"] = 12
    check_run(model, cfg, 1000, view_recipe(cfg, get_method(method).spec, 28))


def test_dino_teacher_has_no_drop_path():
    from selfsup.methods.dino import DINO

    method = DINO(tiny_vit(drop_path=0.3), out_dim=32, hidden=16, bottleneck=8)
    assert method.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)
    assert method.teacher_backbone.blocks[-1].drop_path1.drop_prob == 0.0


def test_layer_scale_given_as_text_is_a_clear_error():
    """`--set backbone.params.layer_scale=1e-5` reaches the ViT as the string '1e-5' (YAML 1.1)."""
    from selfsup.nn.backbones import BackboneError

    with pytest.raises(BackboneError, match="write 1.0e-5"):
        tiny_vit(layer_scale="1e-5")
