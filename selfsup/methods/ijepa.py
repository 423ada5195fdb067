"""I-JEPA: from one context block, predict the target encoder's representations of M target blocks.

Assran, Duval, Misra, Bojanowski, Vincent, Rabbat, LeCun, Ballas. Self-Supervised Learning from
Images with a Joint-Embedding Predictive Architecture. CVPR 2023, arXiv:2301.08243.

Paper defaults: 4 target blocks of scale 0.15–0.2 and aspect 0.75–1.5, a context block of scale
0.85–1 with the targets removed; a narrow ViT predictor given the context tokens plus mask tokens
carrying the target positions; targets are the EMA target encoder's outputs, layer-normalised; the
loss is the average squared ℓ2 distance (eq. 1; the released code uses smooth-ℓ1, ``loss="smooth_l1"``);
EMA momentum 0.996 → 1; no hand-made augmentation (one identity view; the code adds a 0.3–1 crop);
AdamW. CPU adaptations: predictor 3 blocks of width 96 (paper: 12 × 384), a cosine instead of a
linear momentum ramp (the library's one schedule helper).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.losses.masked import latent_prediction_loss, layer_norm_targets
from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.registry import register
from selfsup.nn.ema import check_momentum, frozen_copy
from selfsup.nn.masking import block_masks, gather_tokens
from selfsup.nn.vit import require_vit, sincos_pos_embed_2d
from selfsup.schedules import Schedule
from selfsup.views import Augment, ViewRecipe


class JEPAPredictor(nn.Module):
    """Narrow transformer: context tokens (B, Kc, D) + positions → predictions at M target blocks (B, M, Kt, D)."""

    def __init__(self, embed_dim: int, grid: tuple[int, int], dim: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.register_buffer("pos", sincos_pos_embed_2d(dim, grid)[None])  # (1, L, dim)
        from timm.models.vision_transformer import Block  # here, not at import: timm costs ~2 s of every command

        self.blocks = nn.Sequential(*[Block(dim, heads, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, embed_dim)

    def forward(self, ctx: Tensor, ctx_idx: Tensor, tgt_idx: Tensor) -> Tensor:
        b, m, kt = tgt_idx.shape
        pos = self.pos.expand(b, -1, -1)
        c = self.embed(ctx) + gather_tokens(pos, ctx_idx)  # (B, Kc, d)
        c = c.repeat_interleave(m, dim=0)  # (B·M, Kc, d): one sequence per (image, target block)
        t = gather_tokens(pos, tgt_idx.reshape(b, m * kt)).reshape(b * m, kt, -1) + self.mask_token
        y = self.norm(self.blocks(torch.cat([c, t], dim=1)))[:, -kt:]
        return self.proj(y).reshape(b, m, kt, -1)


@register("ijepa", "latent-prediction", "Assran et al. 2023, Joint-Embedding Predictive Architecture (I-JEPA), arXiv:2301.08243")
class IJEPA(nn.Module):
    spec = MethodSpec(
        views=ViewRecipe(globals_=(Augment.identity(),)),
        min_batch_size=1,
        default_backbone="vit_tiny",
        min_steps=600,
        test_params={"num_targets": 2, "min_context": 2},
    )

    def __init__(self, backbone: nn.Module, *, num_targets: int = 4, target_scale: tuple[float, float] = (0.15, 0.2),
                 target_aspect: tuple[float, float] = (0.75, 1.5), context_scale: tuple[float, float] = (0.85, 1.0),
                 min_context: int = 10, predictor_dim: int = 96, predictor_depth: int = 3, predictor_heads: int = 3,
                 momentum_start: float = 0.996, momentum_end: float = 1.0, loss: str = "l2"):
        super().__init__()
        vit = require_vit(backbone, "ijepa")
        check_momentum("ijepa", momentum_start, momentum_end)
        if loss not in ("l2", "smooth_l1"):
            raise ValueError(f"ijepa: loss must be 'l2' or 'smooth_l1', got {loss!r}")
        if predictor_depth < 1 or predictor_dim % predictor_heads or predictor_dim % 4:
            raise ValueError(f"ijepa: predictor needs depth ≥ 1 and a width divisible by its heads and by 4, got "
                             f"depth {predictor_depth}, width {predictor_dim}, heads {predictor_heads}")
        if not 1 <= min_context < vit.num_patches:
            raise ValueError(f"ijepa: min_context must be in [1, {vit.num_patches}), got {min_context}")
        self.mask_args = dict(num_targets=num_targets, target_scale=tuple(target_scale),
                              target_aspect=tuple(target_aspect), context_scale=tuple(context_scale),
                              min_context=min_context)
        block_masks(2, vit.grid_size, **self.mask_args)  # impossible scales fail here, before training
        self.backbone = vit  # the context encoder
        self.target_encoder = frozen_copy(vit)
        self.predictor = JEPAPredictor(vit.num_features, vit.grid_size, predictor_dim, predictor_depth, predictor_heads)
        self.teacher_momentum = Schedule(momentum_start, momentum_end)
        self.loss = loss

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        (x,) = views
        masks = block_masks(x.shape[0], self.backbone.grid_size, device=x.device, **self.mask_args)
        b, m, kt = masks.targets.shape
        with torch.no_grad():
            t = self.target_encoder
            h = layer_norm_targets(t.encode(t.patch_tokens(x))[:, 1:])  # (B, L, D)
            target = gather_tokens(h, masks.targets.reshape(b, m * kt)).reshape(b, m, kt, -1)
        ctx = self.backbone.encode_visible(x, masks.context)  # (B, 1 + Kc, D)
        pred = self.predictor(ctx[:, 1:], masks.context, masks.targets)
        loss = latent_prediction_loss(pred, target, self.loss)
        return loss, {"z": self.backbone.pool_tokens(ctx).detach(), "context_patches": torch.tensor(float(masks.context.shape[1]))}

    def schedules(self) -> dict[str, Schedule]:
        return {"teacher_momentum": self.teacher_momentum}

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.target_encoder, self.backbone)]

