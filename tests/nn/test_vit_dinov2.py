"""The ViT's DINOv2 options (LayerScale, stochastic depth, register tokens) and its method-facing helpers with
registers: shapes and layout, the masked-token path, timm's own forward, and clear errors."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_BACKBONES
from selfsup.nn.backbones import BackboneError, build_backbone
from selfsup.nn.ema import frozen_copy
from selfsup.nn.vit import require_registers, sincos_pos_embed_2d, without_drop_path
from selfsup.nn.vit_model import ViT


def tiny_vit(**kw) -> ViT:
    return build_backbone("vit_tiny", 1, 16, **{**TINY_BACKBONES["vit_tiny"], **kw})


@pytest.mark.parametrize("registers", [0, 1, 4])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_helpers_keep_their_shapes_with_registers(registers, pool):
    vit = tiny_vit(registers=registers, pool=pool).eval()
    assert vit.num_registers == registers and vit.num_prefix_tokens == 1 + registers
    x = torch.randn(3, 1, 16, 16)
    tokens = vit.patch_tokens(x)
    assert tokens.shape == (3, 16, 48)
    assert vit.prefix_tokens(3).shape == (3, 1 + registers, 48)
    out = vit.encode(tokens)
    assert out.shape == (3, 1 + 16, 48)  # registers dropped: CLS, then the patch tokens
    assert vit.patch_outputs(out).shape == (3, 16, 48) and vit.cls_output(out).shape == (3, 48)
    assert vit.encode_visible(x, torch.arange(16)[:5].expand(3, 5)).shape == (3, 1 + 5, 48)
    assert vit(x).shape == (3, 48)
    # Our path equals timm's own forward (which keeps the registers inside and pools past them).
    torch.testing.assert_close(vit(x), vit.forward_head(vit.forward_features(x)))
    full = vit.forward_features(x)  # (B, 1 + R + N, D), timm's layout
    assert full.shape == (3, 1 + registers + 16, 48)
    torch.testing.assert_close(out, torch.cat([full[:, :1], full[:, 1 + registers:]], dim=1))
    torch.testing.assert_close(vit.pool_tokens(out), vit(x))


def test_registers_are_learnt_and_carry_no_position():
    vit = tiny_vit(registers=4)
    assert vit.reg_token.shape == (1, 4, 48) and vit.reg_token.requires_grad
    assert (vit.pos_embed[0, :5] == 0).all()  # CLS and registers: no position
    torch.testing.assert_close(vit.pos_embed[0, 5:], sincos_pos_embed_2d(48, 4))
    vit(torch.randn(2, 1, 16, 16)).sum().backward()
    assert vit.reg_token.grad is not None and vit.reg_token.grad.abs().sum() > 0
    # A model without registers keeps its state-dict layout (checkpoints written before still load).
    plain = tiny_vit()
    assert "reg_token" not in plain.state_dict() and plain.pos_embed.shape == (1, 17, 48)


@pytest.mark.parametrize("registers", [0, 2])
def test_mask_tokens_per_image(registers):
    vit = tiny_vit(registers=registers).eval()
    x = torch.randn(3, 1, 16, 16)
    token = torch.randn(48)
    full = vit.encode(vit.patch_tokens(x))
    torch.testing.assert_close(vit.encode_with_mask_tokens(x, torch.zeros(3, 16, dtype=torch.bool), token), full)
    # Each image its own mask and count; an all-False row is that image's plain encoding.
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, :5] = True
    mask[2, [1, 7, 8, 15]] = True
    out = vit.encode_with_mask_tokens(x, mask, token)
    torch.testing.assert_close(out[1], full[1])
    assert not torch.allclose(out[0], full[0]) and not torch.allclose(out[2], full[2])
    # Masked image = the encoder on patch embeddings with the token in place, then positions.
    emb = vit.patch_embed(x[2:3]).clone()
    emb[0, mask[2]] = token
    torch.testing.assert_close(out[2:3], vit.encode(emb + vit.pos_embed[:, vit.num_prefix_tokens:]))
    with pytest.raises(ValueError, match=r"\(B, L\) = \(3, 16\) bool"):
        vit.encode_with_mask_tokens(x, mask[:, :8], token)
    with pytest.raises(ValueError, match="bool"):
        vit.encode_with_mask_tokens(x, mask.float(), token)


def test_layer_scale_parameters_start_at_their_init_value():
    vit = tiny_vit(layer_scale=1e-5)
    for block in vit.blocks:
        for ls in (block.ls1, block.ls2):
            assert ls.gamma.shape == (48,) and ls.gamma.requires_grad
            torch.testing.assert_close(ls.gamma.detach(), torch.full((48,), 1e-5))
    # Tiny branches: the whole network starts close to its residual stream.
    assert not any("gamma" in n for n, _ in tiny_vit().named_parameters())  # off by default


def test_drop_path_trains_stochastically_and_is_identity_in_eval():
    vit = tiny_vit(drop_path=0.5)
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in vit.blocks]
    assert rates == pytest.approx([0.0, 0.5])  # timm's rule: linear over the blocks up to the given rate
    x = torch.randn(8, 1, 16, 16)
    vit.eval()
    torch.testing.assert_close(vit(x), vit(x))
    reference = tiny_vit()  # same seed per test: same weights, no drop path
    reference.load_state_dict(vit.state_dict())
    torch.testing.assert_close(vit(x), reference.eval()(x))
    vit.train()
    torch.manual_seed(1)
    a = vit(x)
    b = vit(x)
    assert not torch.allclose(a, b)  # some samples skip the last block's branches
    teacher = without_drop_path(frozen_copy(vit)).train()  # iBOT/DINOv2 teachers run without it
    torch.testing.assert_close(teacher(x), reference.train()(x))


def test_require_registers_and_builder_errors():
    assert require_registers(tiny_vit(registers=4), "dinov2").num_registers == 4
    require_registers(tiny_vit(registers=2), "dinov2", count=2)
    with pytest.raises(ValueError, match="registers=4"):
        require_registers(tiny_vit(), "dinov2")
    with pytest.raises(ValueError, match="needs a ViT with 4 register tokens, this one has 2"):
        require_registers(tiny_vit(registers=2), "dinov2", count=4)
    with pytest.raises(ValueError, match="ViT backbone"):
        require_registers(build_backbone("small_resnet", 1, 16, widths=[8]), "dinov2")
    with pytest.raises(BackboneError, match="registers: an option of vit_small, vit_tiny"):
        build_backbone("small_resnet", 1, 16, registers=4)
    for kwargs, match in (({"registers": -1}, "registers must be ≥ 0"), ({"layer_scale": 0.0}, "layer_scale"),
                          ({"drop_path": 1.0}, r"drop_path .* \[0, 1\)")):
        with pytest.raises(BackboneError, match=match):
            tiny_vit(**kwargs)
    with pytest.raises(BackboneError, match="not divisible by the ViT patch size 4"):
        build_backbone("vit_tiny", 1, 18, registers=4)
