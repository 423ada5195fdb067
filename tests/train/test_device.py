"""Where and how a run computes: the attention path chosen for CPU training under bf16 autocast."""
from __future__ import annotations

import torch

from selfsup.nn.backbones import build_backbone
from selfsup.train.device import choose_attention


def _vit():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", 1, 28, depth=2)


def test_cpu_bf16_training_uses_plain_attention_with_the_same_result():
    fused, plain = _vit(), _vit()
    assert choose_attention(plain, torch.device("cpu"), torch.bfloat16) == 2
    assert all(not m.fused_attn for m in plain.modules() if hasattr(m, "fused_attn"))
    x = torch.randn(4, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fused(x), plain(x)
    assert torch.allclose(a.float(), b.float(), atol=5e-2, rtol=5e-2)
    r = torch.randn(a.shape)  # a loss whose gradient is not ~0 (a plain sum after the final LayerNorm would be)
    (a.float() * r).sum().backward()
    (b.float() * r).sum().backward()
    ga, gb = fused.blocks[0].attn.qkv.weight.grad, plain.blocks[0].attn.qkv.weight.grad
    assert torch.allclose(ga, gb, atol=5e-2 * ga.abs().max().item())


def test_fp32_and_cuda_keep_the_fused_kernel():
    vit = _vit()
    assert choose_attention(vit, torch.device("cpu"), None) == 0
    assert choose_attention(vit, torch.device("cuda"), torch.bfloat16) == 0
    assert all(m.fused_attn for m in vit.modules() if hasattr(m, "fused_attn"))
