"""VideoMAE: hide 90% of the space-time tubes, encode the visible tubelets, reconstruct the hidden pixels.

Tong, Song, Wang, Wang. VideoMAE: Masked Autoencoders are Data-Efficient Learners for Self-Supervised Video
Pre-Training. NeurIPS 2022, arXiv:2203.12602.

Paper defaults: tubelets of 2 frames × 16² pixels (§3.2), *tube* masking at ratio 0.9 — one random spatial mask
shared by every temporal position, so a hidden patch cannot be read off the same place in the next frame (§3.3;
:func:`~selfsup.nn.video_vit.tube_masking`) — the encoder on the visible tokens only, a light decoder that inserts
mask tokens and adds fixed sin-cos positions, MSE on the hidden tubes only, each target tube normalised by its own
mean and standard deviation (``norm_pix_loss``), multi-scale crop + flip and nothing else, AdamW (β = 0.9, 0.95,
wd 0.05). The decoder (blocks, checks) is MAE's (:mod:`selfsup.methods.mae`) and the loss is MAE's
(:func:`~selfsup.losses.masked.masked_mse` on :func:`~selfsup.losses.masked.normalize_patches`): a tube is a patch
of t·p·p·C values. Positions are separable 3-D sin-cos, not the paper's 1-D table (see :mod:`selfsup.nn.video_vit`).
CPU adaptation: the decoder is 2 blocks of width 128 (paper, ViT-B: 4 × 384).

``selfsup report`` draws :meth:`VideoMAE.reconstruct` on test clips as frame strips (input, tube-masked input,
reconstruction with the visible tubes pasted back), as the paper's figures do.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.losses.masked import masked_mse, normalize_patches
from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.mae import check_decoder, decoder_blocks
from selfsup.methods.registry import register
from selfsup.nn.masking import check_mask_ratio
from selfsup.nn.video_vit import TubeMask, require_video_vit, tube_masking, tubelet_patchify, tubelet_unpatchify
from selfsup.views import Augment
from selfsup.views.clips import ClipRecipe

# VideoMAE's GroupMultiScaleCrop: width and height each a random one of (1, 0.875, 0.75, 0.66) of the short side,
# at most one step apart (max_distort 1), then resized; so areas 0.44–1 and aspect ratios 7/8–8/7. Then a flip.
_CROP_FLIP = Augment(scale=(0.44, 1.0), ratio=(7 / 8, 8 / 7), jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


@register("videomae", "masked-modelling",
          "Tong et al. 2022, VideoMAE: Masked Autoencoders are Data-Efficient Learners for Self-Supervised Video "
          "Pre-Training, arXiv:2203.12602")
class VideoMAE(nn.Module):
    spec = MethodSpec(
        views=ClipRecipe(clip_len=8, stride=2, clips=1, augment=_CROP_FLIP),
        inputs="clips",
        min_batch_size=1,
        default_backbone="video_vit",
        stochastic_step=True,  # draws its tube masks inside training_step
        # 0.75 keeps a tube of the registry tests' 16 px clips at patch 8 (2×2 positions; 0.9 would keep none)
        test_params={"mask_ratio": 0.75, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
        min_steps=600,  # as MAE (benchmarks/masked); not yet measured for clips
        micro_batches="per_sample",  # every sample hides the same number of tubes: a mean of per-sample terms
        pictures=("reconstructions",),
    )

    def __init__(self, backbone: nn.Module, *, mask_ratio: float = 0.9, decoder_dim: int = 128,
                 decoder_depth: int = 2, decoder_heads: int = 4, norm_pix_loss: bool = True):
        super().__init__()
        vit = require_video_vit(backbone, "videomae")
        check_mask_ratio(mask_ratio, vit.spatial_grid[0] * vit.spatial_grid[1])
        check_decoder("videomae", decoder_dim, decoder_depth, decoder_heads)
        self.backbone = vit
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        c = vit.patch_embed.in_channels
        self.decoder_embed = nn.Linear(vit.num_features, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder_blocks = decoder_blocks(decoder_dim, decoder_depth, decoder_heads)
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, vit.tubelet * vit.patch_size ** 2 * c)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def predict(self, x: Tensor, m: TubeMask | None = None) -> tuple[Tensor, TubeMask, Tensor]:
        """Clips (B, C, T, H, W) → predicted tubes (B, L, t·p·p·C) in token order, the tube mask (drawn here
        unless given) and the mean encoding of the visible tokens (B, D)."""
        vit = self.backbone
        grid = vit.token_grid(x)
        if m is None:
            m = tube_masking(x.shape[0], grid, self.mask_ratio, x.device)
        encoded = vit.forward_visible(x, m.keep)  # (B, K, D)
        latent = self.decoder_embed(encoded)  # (B, K, Dd)
        b, _, d = latent.shape
        # Mask tokens everywhere, the visible tokens' latents scattered back to their places (token order).
        full = self.mask_token.to(latent.dtype).expand(b, m.mask.shape[1], d)
        y = full.scatter(1, m.keep.unsqueeze(-1).expand(-1, -1, d), latent) + vit.pos_embed_for(grid, d)
        pred = self.decoder_pred(self.decoder_norm(self.decoder_blocks(y)))
        return pred, m, encoded.mean(dim=1)

    def pixel_targets(self, x: Tensor) -> Tensor:
        """(B, C, T, H, W) → (B, L, t·p·p·C) what the decoder predicts: each tube's pixels, normalised by the
        tube's own mean and (unbiased) standard deviation when ``norm_pix_loss``."""
        target = tubelet_patchify(x, self.backbone.tubelet, self.backbone.patch_size)
        return normalize_patches(target) if self.norm_pix_loss else target

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised clips (B, C, T, H, W) → (the clips with their hidden tubes at 0, the reconstruction with the
        visible tubes pasted back). Normalised-pixel predictions are mapped back with each true tube's mean and
        spread, as MAE's figures do."""
        vit = self.backbone
        pred, m, _ = self.predict(x)
        target = tubelet_patchify(x, vit.tubelet, vit.patch_size)
        if self.norm_pix_loss:
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        w = m.mask.unsqueeze(-1).to(x.dtype)
        grid = vit.token_grid(x)
        return (tubelet_unpatchify(target * (1 - w), vit.tubelet, vit.patch_size, grid),
                tubelet_unpatchify(target * (1 - w) + pred * w, vit.tubelet, vit.patch_size, grid))

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        (x,) = views
        pred, m, z = self.predict(x)
        return masked_mse(pred, self.pixel_targets(x), m.mask), {"z": z.detach()}
