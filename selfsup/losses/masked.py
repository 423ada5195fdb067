"""Losses of masked image modelling (pixels) and latent prediction (representations).

Patch tensors are (B, L, K) with K = p·p·C values per patch (see ``selfsup.nn.masking.patchify``);
masks are (B, L), 1/True where the patch was hidden from the encoder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def normalize_patches(target: Tensor, eps: float = 1e-6) -> Tensor:
    """(B, L, K) → each patch standardised by its own mean and (unbiased) variance.

    MAE's ``norm_pix_loss`` target (He et al. 2021, arXiv:2111.06377 §4, "normalized pixels"),
    which improves representation quality over raw pixels.
    """
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps).sqrt()


def _masked_mean(per_patch: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(per_patch.dtype)
    total = mask.sum()
    if total == 0:
        raise ValueError("the mask hides no patch, so a masked loss has nothing to average")
    return (per_patch * mask).sum() / total


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """MAE's loss: mean squared error per patch, averaged over the hidden patches only.

    pred, target: (B, L, K); mask: (B, L). Visible patches contribute nothing (arXiv:2111.06377 §3,
    "we compute the loss only on masked patches").
    """
    return _masked_mean((pred - target).pow(2).mean(dim=-1), mask)


def masked_l1(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """SimMIM's loss: ℓ1 over the hidden pixels, averaged over hidden pixels and channels
    (Xie et al. 2021, arXiv:2111.09886 eq. 1). pred, target: (B, L, K); mask: (B, L)."""
    return _masked_mean((pred - target).abs().mean(dim=-1), mask)


def latent_prediction_loss(pred: Tensor, target: Tensor, kind: str = "l2") -> Tensor:
    """I-JEPA's loss between predicted and target patch representations, (N, T, D) each, averaged.

    ``"l2"``: the paper's average squared ℓ2 distance per coordinate (Assran et al. 2023,
    arXiv:2301.08243 eq. 1); ``"smooth_l1"``: what the released code uses (Huber, β = 1). The targets
    are the target encoder's outputs layer-normalised over D and must carry no gradient.
    """
    if kind == "l2":
        return F.mse_loss(pred, target)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target)
    raise ValueError(f"latent prediction loss must be 'l2' or 'smooth_l1', got {kind!r}")


@torch.no_grad()
def layer_norm_targets(h: Tensor) -> Tensor:
    """(…, D) target-encoder features normalised over D without affine parameters (I-JEPA §3)."""
    return F.layer_norm(h, h.shape[-1:])
