"""Vision Transformers for small images, on timm's ``VisionTransformer`` (Dosovitskiy et al. 2020,
arXiv:2010.11929), with what masked methods need besides the backbone contract.

Patch size 4 on 28×28 / 32×32 inputs (7×7 / 8×8 patches), a CLS token, ``pool="cls"`` or ``"mean"``
(mean of the patch tokens), and fixed 2-D sin-cos position embeddings (MAE, arXiv:2111.06377 §A.1;
MoCo v3, arXiv:2104.02057).

Other input sizes (multi-crop's local crops, Caron et al. 2020/2021): any size the patch size divides. Its
grid gets the sin-cos embeddings evaluated at the positions DINO's ``interpolate_pos_encoding`` resamples
(arXiv:2104.14294, the reference ``vision_transformer.py``): a g-cell grid spread over the G cells of the
training grid, cell i at (i + ½)·G/g − ½ (``F.interpolate``'s ``align_corners=False`` geometry), so a local
crop covers the same range of positions as a global view, at coarser spacing. The embeddings are a fixed
function, so they are computed exactly rather than interpolated, once per grid (cached per device and dtype). Beyond ``forward(x) -> (B, D)``, a :class:`ViT` exposes the patch grid
and ways to run the encoder on a subset of patch tokens (MAE, MSN, I-JEPA) or with mask tokens in
place of hidden patches (SimMIM, iBOT).

DINOv2's options (Oquab et al. 2023, arXiv:2304.07193), all timm's own ``VisionTransformer`` features:
``layer_scale`` (LayerScale, Touvron et al. 2021, arXiv:2103.17239: each residual branch scaled by a
learnt per-channel factor starting at this value; DINOv2 uses 1e-5), ``drop_path`` (stochastic depth,
rates rising linearly over the blocks to this value, timm's rule; iBOT's ViT-S uses 0.1, DINOv2's
ViT-L 0.3 at a uniform rate) and ``registers`` (Darcet et al. 2024, arXiv:2309.16588: extra learnt
tokens with no position, 4 in DINOv2's ``reg4`` models, where the attention can keep global information
instead of repurposing low-information patch tokens, the high-norm artefacts of large ViTs).

Token layout. Inside the blocks the sequence is ``[CLS, R registers, N patch tokens]`` (timm's order).
The method-facing helpers drop the register outputs after the last block (they are scratch space, never
a feature), so :meth:`ViT.encode` and everything built on it return (B, 1 + N, D): CLS first, then the
patch tokens in the order given, with or without registers. :meth:`ViT.patch_outputs` and
:meth:`ViT.cls_output` name the two parts.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from selfsup.nn.masking import gather_tokens, substitute_mask_tokens
from selfsup.nn.vit import sincos_pos_embed_2d


class ViT(VisionTransformer):
    """timm's ViT with a CLS token, fixed sin-cos positions and no classifier; ``forward`` → (B, D) pooled."""

    def __init__(self, in_chans: int, image_size: int, patch_size: int = 4, embed_dim: int = 192,
                 depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0, pool: str = "cls",
                 layer_scale: float | None = None, drop_path: float = 0.0, registers: int = 0):
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by the ViT patch size {patch_size}; "
                             "pick a patch size that divides it (e.g. 4 for 28 or 32)")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if depth < 1:
            raise ValueError(f"depth must be ≥ 1, got {depth}")
        if isinstance(layer_scale, str) or isinstance(drop_path, str):
            raise ValueError(f"layer_scale and drop_path must be numbers, got {layer_scale!r} and {drop_path!r} (YAML "
                             "reads 1e-5 as text: write 1.0e-5)")
        if layer_scale is not None and not layer_scale > 0:
            raise ValueError(f"layer_scale is LayerScale's initial value and must be > 0 (DINOv2: 1e-5), or None "
                             f"for no LayerScale; got {layer_scale}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path (the stochastic-depth rate of the last block) must be in [0, 1), got {drop_path}")
        if registers < 0:
            raise ValueError(f"registers must be ≥ 0 (DINOv2 uses 4), got {registers}")
        # fc_norm=False keeps self.norm the final LayerNorm for both poolings, so masked methods
        # and evaluation see the same normalised tokens.
        super().__init__(img_size=image_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                         global_pool="token" if pool == "cls" else "avg", embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, class_token=True, fc_norm=False,
                         init_values=layer_scale, drop_path_rate=drop_path, reg_tokens=registers)
        self.patch_size = patch_size
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.pool_kind = pool
        # Rows for CLS and registers are zero: registers carry no position (Darcet et al.), CLS none either.
        pos = sincos_pos_embed_2d(embed_dim, self.grid_size, cls_token=True)
        self.pos_embed.data.copy_(torch.cat([pos[:1].expand(1 + registers, -1), pos[1:]])[None])
        self.pos_embed.requires_grad_(False)
        # Other input sizes get their own positions (pos_embed_for); divisibility is checked by patch_grid.
        self.patch_embed.strict_img_size = False
        self.pos_cache: dict[tuple, Tensor] = {}
        """Patch position embeddings of grids other than the training one, per (grid, device, dtype)."""

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_registers(self) -> int:
        return self.num_reg_tokens

    def input_problem(self, size: int) -> str | None:
        """Why a square input of ``size`` pixels cannot be encoded (None when it can): read by the run checks
        (``selfsup.train.build.check_run``) for every view size, so a local-crop size the patch size does not
        divide fails before training, not at its first step."""
        p = self.patch_size
        if size < p or size % p:
            return (f"a {size}px view is not divisible by the ViT patch size {p}: set the view size to a multiple "
                    f"of {p} (e.g. views.local_size={max(p, size // p * p)}) or pick another patch size")
        return None

    def patch_grid(self, x: Tensor) -> tuple[int, int]:
        """The (h, w) patch grid of images ``x`` (B, C, H, W); a ValueError when the patch size does not divide."""
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p or h < p or w < p:
            raise ValueError(f"ViT: a {h}×{w} input is not divisible by the patch size {p}; resize the views to a "
                             f"multiple of {p}")
        return h // p, w // p

    def pos_embed_for(self, grid: tuple[int, int]) -> Tensor:
        """(1, h·w, D) position embeddings of the patch tokens of an h×w grid: the stored ones for the training
        grid, otherwise the sin-cos embeddings spread over the training grid's range (module docstring)."""
        if tuple(grid) == tuple(self.grid_size):
            return self.pos_embed[:, self.num_prefix_tokens:]
        key = (tuple(grid), self.pos_embed.device, self.pos_embed.dtype)
        if key not in self.pos_cache:
            pos = sincos_pos_embed_2d(self.embed_dim, tuple(grid), extent=self.grid_size)
            self.pos_cache[key] = pos[None].to(self.pos_embed.device, self.pos_embed.dtype)
        return self.pos_cache[key]

    def patch_tokens(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, L, D) patch embeddings plus their position embeddings (any size the patch divides)."""
        grid = self.patch_grid(x)
        return self.patch_embed(x) + self.pos_embed_for(grid)

    def prefix_tokens(self, batch: int) -> Tensor:
        """(B, 1 + R, D): the CLS token, then the R register tokens, with their (zero) positions added."""
        prefix = self.cls_token if self.reg_token is None else torch.cat([self.cls_token, self.reg_token], dim=1)
        return (prefix + self.pos_embed[:, :self.num_prefix_tokens]).expand(batch, -1, -1)

    def encode(self, tokens: Tensor) -> Tensor:
        """(B, N, D) positioned patch tokens (any subset) → (B, 1 + N, D) normalised outputs, CLS first.

        The blocks see (B, 1 + R + N, D) with the R registers after CLS; their outputs are dropped here."""
        x = self.norm_pre(torch.cat([self.prefix_tokens(tokens.shape[0]), tokens], dim=1))
        out = self.norm(self.blocks(x))
        return out if self.reg_token is None else torch.cat([out[:, :1], out[:, self.num_prefix_tokens:]], dim=1)

    @staticmethod
    def cls_output(tokens: Tensor) -> Tensor:
        """(B, 1 + N, D) outputs of :meth:`encode` → (B, D) the CLS token."""
        return tokens[:, 0]

    @staticmethod
    def patch_outputs(tokens: Tensor) -> Tensor:
        """(B, 1 + N, D) outputs of :meth:`encode` → (B, N, D) the patch tokens, in the order they went in."""
        return tokens[:, 1:]

    def encode_visible(self, x: Tensor, keep: Tensor) -> Tensor:
        """The encoder on the kept patches only, (B, K) indices → (B, 1 + K, D) (MAE, MSN, I-JEPA)."""
        return self.encode(gather_tokens(self.patch_tokens(x), keep))

    def encode_with_mask_tokens(self, x: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
        """Every patch, hidden ones replaced by ``mask_token`` (D,) before the position embedding is added
        (SimMIM; iBOT's and DINOv2's masked student) → (B, 1 + L, D).

        mask: (B, L) bool, True = hidden, its own pattern and count per image (an all-False row is the
        plain encoder on that image); L is the patch count of ``x``'s size."""
        grid = self.patch_grid(x)
        n = grid[0] * grid[1]
        if mask.shape != (x.shape[0], n) or mask.dtype != torch.bool:
            raise ValueError(f"encode_with_mask_tokens: mask must be a (B, L) = ({x.shape[0]}, {n}) "
                             f"bool tensor, True where the patch is hidden; got {tuple(mask.shape)} {mask.dtype}")
        tokens = substitute_mask_tokens(self.patch_embed(x), mask, mask_token)
        return self.encode(tokens + self.pos_embed_for(grid))

    def pool_tokens(self, tokens: Tensor) -> Tensor:
        """(B, 1 + N, D) encoder outputs → (B, D): the CLS token or the mean of the patch tokens."""
        return self.cls_output(tokens) if self.pool_kind == "cls" else self.patch_outputs(tokens).mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool_tokens(self.encode(self.patch_tokens(x)))

    def forward_maps(self, x: Tensor, blocks: int = 1) -> tuple[Tensor, list[Tensor]]:
        """(pooled features as :meth:`forward` gives them, the patch tokens of the last ``blocks`` blocks, each
        through the final norm and reshaped to a (B, D, h, w) map, earlier blocks first): DINOv2's linear
        segmentation protocol reads the last block's (or the last four) this way (``get_intermediate_layers``
        with ``norm=True``, ``reshape=True``)."""
        if not 1 <= blocks <= len(self.blocks):
            raise ValueError(f"ViT: blocks must be 1–{len(self.blocks)} (its depth), got {blocks}")
        grid = self.patch_grid(x)
        h = self.norm_pre(torch.cat([self.prefix_tokens(x.shape[0]), self.patch_tokens(x)], dim=1))
        outs = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i >= len(self.blocks) - blocks:
                outs.append(self.norm(h))
        n = self.num_prefix_tokens
        last = outs[-1]
        pooled = self.pool_tokens(last if self.reg_token is None else torch.cat([last[:, :1], last[:, n:]], dim=1))
        maps = [o[:, n:].transpose(1, 2).reshape(x.shape[0], self.embed_dim, *grid) for o in outs]
        return pooled, maps
