"""MAE: hide 75% of the patches, encode the visible ones, reconstruct the hidden pixels.

He, Chen, Xie, Li, Dollár, Girshick. Masked Autoencoders Are Scalable Vision Learners. CVPR 2022,
arXiv:2111.06377.

Paper defaults: mask ratio 0.75, the encoder sees visible patches only (no mask tokens), a light
decoder with its own fixed sin-cos positions that inserts mask tokens, MSE on hidden patches only,
normalised-pixel targets, random-resized-crop (0.2–1) + flip and nothing else, AdamW
(β = 0.9, 0.95, wd 0.05). CPU adaptation: the decoder is 2 blocks of width 128 (paper: 8 × 512).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.losses.masked import masked_mse, normalize_patches
from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.registry import register
from selfsup.nn.masking import check_mask_ratio, patchify, random_masking, unpatchify
from selfsup.nn.vit import require_vit, sincos_pos_embed_2d
from selfsup.views import Augment, ViewRecipe


def check_decoder(method: str, dim: int, depth: int, heads: int) -> None:
    """The ValueError of a decoder shape MAE-style decoders cannot build (VideoMAE shares the decoder)."""
    if depth < 1 or dim % heads or dim % 4:
        raise ValueError(f"{method}: decoder needs depth ≥ 1 and a width divisible by its heads and by 4, got "
                         f"depth {depth}, width {dim}, heads {heads}")


def decoder_blocks(dim: int, depth: int, heads: int) -> nn.Sequential:
    """The light decoder's transformer blocks (timm's ``Block``, qkv bias), shared by MAE and VideoMAE."""
    from timm.models.vision_transformer import Block  # here, not at import: timm costs ~2 s of every command

    return nn.Sequential(*[Block(dim, heads, qkv_bias=True) for _ in range(depth)])


@register("mae", "masked-modelling", "He et al. 2021, Masked Autoencoders Are Scalable Vision Learners, arXiv:2111.06377")
class MAE(nn.Module):
    spec = MethodSpec(
        views=ViewRecipe(globals_=(Augment(scale=(0.2, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0),)),
        min_batch_size=1,
        default_backbone="vit_tiny",
        min_steps=600,
        pictures=("reconstructions",),
        micro_batches="per_sample",  # a mean of per-sample terms
    )

    def __init__(self, backbone: nn.Module, *, mask_ratio: float = 0.75, decoder_dim: int = 128,
                 decoder_depth: int = 2, decoder_heads: int = 4, norm_pix_loss: bool = True):
        super().__init__()
        vit = require_vit(backbone, "mae")
        check_mask_ratio(mask_ratio, vit.num_patches)
        check_decoder("mae", decoder_dim, decoder_depth, decoder_heads)
        self.backbone = vit
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        if norm_pix_loss:  # shown on the reconstruction picture: the absolute intensities are not predicted
            self.reconstruction_note = "normalised-pixel predictions shown with each true patch's mean and std"
        p, c = vit.patch_size, vit.patch_embed.proj.in_channels
        self.decoder_embed = nn.Linear(vit.num_features, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("decoder_pos", sincos_pos_embed_2d(decoder_dim, vit.grid_size, cls_token=True)[None])
        self.decoder_blocks = decoder_blocks(decoder_dim, decoder_depth, decoder_heads)
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, p * p * c)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def _predict(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C, H, W) → predicted patches (B, L, p·p·C), the mask (B, L) (True = hidden) and the pooled
        encoding of the visible patches (B, D)."""
        vit = self.backbone
        m = random_masking(x.shape[0], vit.num_patches, self.mask_ratio, x.device)
        encoded = vit.encode_visible(x, m.keep)  # (B, 1 + K, D)
        latent = self.decoder_embed(encoded)  # (B, 1 + K, Dd)
        b, k1, d = latent.shape
        hidden = self.mask_token.expand(b, vit.num_patches - (k1 - 1), d)
        # Back to raster order: kept tokens first, then mask tokens, unshuffled by the restore index.
        patches = torch.cat([latent[:, 1:], hidden], dim=1).gather(1, m.restore.unsqueeze(-1).expand(-1, -1, d))
        y = torch.cat([latent[:, :1], patches], dim=1) + self.decoder_pos
        y = self.decoder_pred(self.decoder_norm(self.decoder_blocks(y)))
        return y[:, 1:], m.mask, vit.pool_tokens(encoded)

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        (x,) = views
        pred, mask, z = self._predict(x)
        target = patchify(x, self.backbone.patch_size)
        if self.norm_pix_loss:
            target = normalize_patches(target)
        return masked_mse(pred, target, mask), {"z": z.detach()}

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) normalised images → (masked input with hidden patches at 0, reconstruction with the
        visible patches pasted back). Normalised-pixel predictions are mapped back with each true patch's
        mean and spread, as in the paper's figures."""
        p = self.backbone.patch_size
        pred, mask, _ = self._predict(x)
        target = patchify(x, p)
        if self.norm_pix_loss:
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        w = mask.unsqueeze(-1).to(x.dtype)
        grid = self.backbone.grid_size
        return unpatchify(target * (1 - w), p, grid), unpatchify(target * (1 - w) + pred * w, p, grid)
