"""SimMIM: replace hidden patches by a learnable mask token, regress their raw pixels with a linear head.

Xie, Zhang, Cao, Lin, Bao, Yao, Dai, Hu. SimMIM: A Simple Framework for Masked Image Modeling.
CVPR 2022, arXiv:2111.09886.

Paper defaults: random masking of 0.6 of the image in square units (``mask_patch_size``, 32 px on
192 px images; here one ViT patch unless set, since 28 = 4·7 allows no coarser unit), the encoder
sees every position with a learnable mask token in place of hidden patch embeddings, a one-layer
linear prediction head to pixels, ℓ1 loss on hidden pixels only, random-resized-crop (0.67–1) + flip,
AdamW (wd 0.05).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.losses.masked import masked_l1
from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.registry import register
from selfsup.nn.masking import check_mask_ratio, patchify, random_masking, unpatchify
from selfsup.nn.vit import require_vit
from selfsup.views import Augment, ViewRecipe


@register("simmim", "masked-modelling", "Xie et al. 2021, SimMIM: A Simple Framework for Masked Image Modeling, arXiv:2111.09886")
class SimMIM(nn.Module):
    spec = MethodSpec(
        views=ViewRecipe(globals_=(Augment(scale=(0.67, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0),)),
        min_batch_size=1,
        default_backbone="vit_tiny",
        min_steps=600,
        pictures=("reconstructions",),
        micro_batches="per_sample",  # a mean of per-sample terms
    )

    def __init__(self, backbone: nn.Module, *, mask_ratio: float = 0.6, mask_patch_size: int | None = None):
        super().__init__()
        vit = require_vit(backbone, "simmim")
        p = vit.patch_size
        unit = mask_patch_size or p
        gh, gw = vit.grid_size
        if unit % p or (gh * p) % unit or (gw * p) % unit:
            raise ValueError(f"simmim: mask_patch_size {unit} must be a multiple of the patch size {p} and divide "
                             f"the image size {gh * p}")
        self.unit = unit // p  # mask unit side, in patches
        check_mask_ratio(mask_ratio, (gh // self.unit) * (gw // self.unit))
        self.backbone = vit
        self.mask_ratio = mask_ratio
        self.mask_token = nn.Parameter(torch.zeros(vit.num_features))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(vit.num_features, p * p * vit.patch_embed.proj.in_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def draw_mask(self, batch: int, device: torch.device) -> Tensor:
        """(B, L) bool, True = hidden: random masking on the grid of mask units, upsampled to patches."""
        gh, gw = self.backbone.grid_size
        u = self.unit
        coarse = random_masking(batch, (gh // u) * (gw // u), self.mask_ratio, device).mask
        fine = coarse.view(batch, gh // u, gw // u).repeat_interleave(u, 1).repeat_interleave(u, 2)
        return fine.flatten(1)

    def _predict(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C, H, W) → predicted patches (B, L, p·p·C), the mask (B, L) and the pooled encoding (B, D)."""
        mask = self.draw_mask(x.shape[0], x.device)
        tokens = self.backbone.encode_with_mask_tokens(x, mask, self.mask_token)  # (B, 1 + L, D)
        return self.head(tokens[:, 1:]), mask, self.backbone.pool_tokens(tokens)

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        (x,) = views
        pred, mask, z = self._predict(x)
        return masked_l1(pred, patchify(x, self.backbone.patch_size), mask), {"z": z.detach()}

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) normalised images → (masked input with hidden patches at 0, reconstruction with the
        visible patches pasted back)."""
        p, grid = self.backbone.patch_size, self.backbone.grid_size
        pred, mask, _ = self._predict(x)
        target = patchify(x, p)
        w = mask.unsqueeze(-1).to(x.dtype)
        return unpatchify(target * (1 - w), p, grid), unpatchify(target * (1 - w) + pred * w, p, grid)
