"""Vision Transformers for small images, on timm's ``VisionTransformer`` (Dosovitskiy et al. 2020,
arXiv:2010.11929), with what masked methods need besides the backbone contract.

Patch size 4 on 28×28 / 32×32 inputs (7×7 / 8×8 patches), a CLS token, ``pool="cls"`` or ``"mean"``
(mean of the patch tokens), and fixed 2-D sin-cos position embeddings (MAE, arXiv:2111.06377 §A.1;
MoCo v3, arXiv:2104.02057). Beyond ``forward(x) -> (B, D)``, a :class:`ViT` exposes the patch grid
and ways to run the encoder on a subset of patch tokens (MAE, MSN, I-JEPA) or with mask tokens in
place of hidden patches (SimMIM).
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from selfsup.nn.adapters import LibraryBackbone
from selfsup.nn.backbones import register_backbone
from selfsup.nn.masking import gather_tokens, substitute_mask_tokens


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(N,) positions → (N, dim): half sines, half cosines over geometric frequencies 1/10000^(2i/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> Tensor:
    """Fixed 2-D sin-cos position embeddings, (h·w, D) in raster order, or (1 + h·w, D) with a zero row
    for the CLS token first. Half the channels encode the row, half the column (MAE's layout)."""
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embeddings need embed_dim divisible by 4, got {embed_dim}")
    rows = torch.arange(gh).repeat_interleave(gw)
    cols = torch.arange(gw).repeat(gh)
    emb = torch.cat([_sincos_1d(embed_dim // 2, rows), _sincos_1d(embed_dim // 2, cols)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb])
    return emb.float()


class ViT(VisionTransformer):
    """timm's ViT with a CLS token, fixed sin-cos positions and no classifier; ``forward`` → (B, D) pooled."""

    def __init__(self, in_chans: int, image_size: int, patch_size: int = 4, embed_dim: int = 192,
                 depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0, pool: str = "cls"):
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by the ViT patch size {patch_size}; "
                             "pick a patch size that divides it (e.g. 4 for 28 or 32)")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if depth < 1:
            raise ValueError(f"depth must be ≥ 1, got {depth}")
        # fc_norm=False keeps self.norm the final LayerNorm for both poolings, so masked methods
        # and evaluation see the same normalised tokens.
        super().__init__(img_size=image_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                         global_pool="token" if pool == "cls" else "avg", embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, class_token=True, fc_norm=False)
        self.patch_size = patch_size
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.pool_kind = pool
        self.pos_embed.data.copy_(sincos_pos_embed_2d(embed_dim, self.grid_size, cls_token=True)[None])
        self.pos_embed.requires_grad_(False)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def patch_tokens(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, L, D) patch embeddings plus their position embeddings."""
        return self.patch_embed(x) + self.pos_embed[:, 1:]

    def encode(self, tokens: Tensor) -> Tensor:
        """(B, N, D) positioned patch tokens (any subset) → (B, 1 + N, D) normalised outputs, CLS first."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = self.norm_pre(torch.cat([cls, tokens], dim=1))
        return self.norm(self.blocks(x))

    def encode_visible(self, x: Tensor, keep: Tensor) -> Tensor:
        """The encoder on the kept patches only, (B, K) indices → (B, 1 + K, D) (MAE, MSN, I-JEPA)."""
        return self.encode(gather_tokens(self.patch_tokens(x), keep))

    def encode_with_mask_tokens(self, x: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
        """Every patch, hidden ones (mask (B, L), True = hidden) replaced by ``mask_token`` (D,) before the
        position embedding is added (SimMIM) → (B, 1 + L, D)."""
        tokens = substitute_mask_tokens(self.patch_embed(x), mask, mask_token)
        return self.encode(tokens + self.pos_embed[:, 1:])

    def pool_tokens(self, tokens: Tensor) -> Tensor:
        """(B, 1 + N, D) encoder outputs → (B, D): the CLS token or the mean of the patch tokens."""
        return tokens[:, 0] if self.pool_kind == "cls" else tokens[:, 1:].mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool_tokens(self.encode(self.patch_tokens(x)))


VIT_NAMES = ("vit_tiny", "vit_small")


def require_vit(backbone: nn.Module, method: str) -> ViT:
    """The backbone, if it is a :class:`ViT`; otherwise the ValueError every masked method raises."""
    if isinstance(backbone, LibraryBackbone):  # a timm/torchvision ViT lacks the patch-level API used here
        raise ValueError(f"{method}: masked methods need selfsup's own ViT backbone ({', '.join(VIT_NAMES)}), which "
                         f"exposes the patch grid and encodes a subset of patches; {backbone.name} does not. Use "
                         f"--backbone {VIT_NAMES[-1]} (backbone.params: patch_size, depth, embed_dim, num_heads)")
    if not isinstance(backbone, ViT):
        raise ValueError(f"{method}: masked methods need a ViT backbone ({', '.join(VIT_NAMES)}); "
                         f"got {type(backbone).__name__}")
    return backbone


@register_backbone("vit_tiny")
def vit_tiny(in_chans: int, image_size: int, depth: int = 12, embed_dim: int = 192, num_heads: int = 3,
             patch_size: int = 4, pool: str = "cls") -> ViT:
    """ViT-Ti (DeiT, arXiv:2012.12877): width 192, 3 heads; ``depth`` lowered for CPU recipes."""
    return ViT(in_chans, image_size, patch_size, embed_dim, depth, num_heads, pool=pool)


@register_backbone("vit_small")
def vit_small(in_chans: int, image_size: int, depth: int = 12, embed_dim: int = 384, num_heads: int = 6,
              patch_size: int = 4, pool: str = "cls") -> ViT:
    """ViT-S (DeiT, arXiv:2012.12877): width 384, 6 heads."""
    return ViT(in_chans, image_size, patch_size, embed_dim, depth, num_heads, pool=pool)
