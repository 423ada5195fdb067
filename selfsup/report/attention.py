"""Attention maps of a ViT encoder: where the CLS token looks in the last block, per head.

The picture of DINO's paper (Caron et al. 2021, arXiv:2104.14294, fig. 1 and 3): for a few images, the
last block's self-attention from the CLS token to every patch, one map per head, shown over the image.
Computed from the block's own query/key projections, so it is the attention the encoder applies
(timm's fused kernel returns no weights; this recomputes them for the last block only).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pathlib import Path
from typing import Sequence

import torch
from matplotlib.figure import Figure
import torch.nn.functional as F
from torch import Tensor

from selfsup.monitor.features import eval_mode
from selfsup.report.curves import save_figure
from selfsup.report.reconstructions import model_inputs

if TYPE_CHECKING:
    from selfsup.nn.vit_model import ViT

FILENAME = "attention.png"


@torch.no_grad()
def cls_attention(vit: ViT, x: Tensor) -> Tensor:
    """(B, C, H, W) normalised images → (B, heads, gh, gw): the last block's softmax attention weights
    from the CLS token to each patch (each map sums to 1 minus the CLS token's attention to itself and to the
    register tokens, when the ViT has them: the sequence the blocks see is the encoder's own, CLS, registers,
    patches, from :meth:`ViT.prefix_tokens` and :meth:`ViT.patch_tokens`)."""
    tokens = vit.patch_tokens(x)
    grid = vit.patch_grid(x)
    h = vit.norm_pre(torch.cat([vit.prefix_tokens(tokens.shape[0]), tokens], dim=1))
    for block in vit.blocks[:-1]:
        h = block(h)
    last = vit.blocks[-1]
    attn = last.attn
    b, n, _ = h.shape
    qkv = attn.qkv(last.norm1(h)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, 1, N)
    return weights[:, :, 0, vit.num_prefix_tokens:].reshape(b, attn.num_heads, *grid)


def save_attention_maps(vit: ViT, images: Tensor, path: str | Path, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None, title: str | None = None) -> Path:
    """A PNG grid: one column per image; the image, then each head's CLS attention upsampled over it."""
    x, x_in = model_inputs(vit, images, mean, std)
    with eval_mode(vit):
        maps = cls_attention(vit, x_in).float()
    maps = F.interpolate(maps, size=x.shape[-2:], mode="nearest").cpu()
    x = x.float().cpu()
    heads = maps.shape[1]
    n = x.shape[0]
    fig = Figure(figsize=(1.2 * n, 1.3 * (1 + heads)))
    axes = fig.subplots(1 + heads, n, squeeze=False)
    for i in range(n):
        img = x[i, 0].numpy() if x.shape[1] == 1 else x[i].permute(1, 2, 0).numpy()
        axes[0][i].imshow(img, cmap="gray" if x.shape[1] == 1 else None, vmin=0, vmax=1)
        for hd in range(heads):
            ax = axes[1 + hd][i]
            ax.imshow(x[i].mean(0).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.imshow(maps[i, hd].numpy(), cmap="inferno", alpha=0.6)
    for r in range(1 + heads):
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel("image" if r == 0 else f"head {r}", fontsize=8)
    fig.suptitle(title or "last block: attention of the CLS token to each patch, per head", fontsize=9)
    return save_figure(fig, path)
