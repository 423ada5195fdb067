"""Masked Siamese Networks' loss: masked anchors matched to sharpened targets over learnable prototypes.

Assran et al. 2022, Masked Siamese Networks for Label-Efficient Learning, arXiv:2204.07141 §3
(eq. 1–3). Anchors z (V·B, d): V masked views of B images, view-major (row v·B + b is view v of
image b); targets z⁺ (B, d) from the EMA encoder on the unmasked view; prototypes q (K, d).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses.clustering import sinkhorn_knopp
from selfsup.losses.precision import fp32_loss
from selfsup import distributed as dist


def prototype_probs(z: Tensor, prototypes: Tensor, temperature: float) -> Tensor:
    """(N, d), (K, d) → (N, K): softmax over prototypes of cosine similarity / τ (MSN eq. 1)."""
    return F.softmax(F.normalize(z, dim=1) @ F.normalize(prototypes, dim=1).T / temperature, dim=1)


@fp32_loss
def msn_loss(anchor: Tensor, target: Tensor, prototypes: Tensor, temperature: float = 0.1,
             target_temperature: float = 0.025, me_max_weight: float = 1.0, sinkhorn_iterations: int = 3,
             gather: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """MSN objective, H(p⁺, p) averaged over anchors, minus λ times the entropy of the mean prediction.

    anchor: (V·B, d); target: (B, d), no gradient is taken through it; prototypes: (K, d).
    p = softmax(cos(z, q)/τ); p⁺ = softmax(cos(z⁺, q)/τ⁺), the paper's sharpening with τ⁺ < τ
    (sharpen(p, T) = p^{1/T}/Σ equals τ⁺ = T·τ: 0.025 = 0.25·0.1), then balanced by Sinkhorn-Knopp
    (SwAV's, arXiv:2006.09882, run on p⁺ itself as MSN's code does) when ``sinkhorn_iterations`` > 0. me-max (eq. 3): λ·(log K − H(p̄)) with p̄ the mean anchor prediction
    over the (gathered) batch, ≥ 0 and 0 when every prototype is used equally. Returns
    (loss, {"cross_entropy", "me_max"}).
    """
    if temperature <= 0 or target_temperature <= 0:
        raise ValueError(f"msn temperatures must be > 0, got {temperature}, {target_temperature}")
    b = target.shape[0]
    if anchor.shape[0] % b:
        raise ValueError(f"anchor rows ({anchor.shape[0]}) must be a multiple of the targets' ({b})")
    probs = prototype_probs(anchor, prototypes, temperature)
    with torch.no_grad():
        targets = prototype_probs(target.detach(), prototypes.detach(), target_temperature)
        if sinkhorn_iterations > 0:
            # MSN balances the sharpened probabilities themselves: exp(log p⁺ / 1) = p⁺.
            targets = sinkhorn_knopp(targets.clamp_min(1e-30).log(), 1.0, sinkhorn_iterations, gather=gather)
        targets = targets.repeat(anchor.shape[0] // b, 1)
    cross_entropy = -(targets * torch.log(probs.clamp_min(1e-12))).sum(dim=1).mean()
    mean_probs = (dist.gather(probs) if gather else probs).mean(dim=0)
    me_max = (mean_probs * torch.log(mean_probs.clamp_min(1e-12))).sum() + math.log(mean_probs.shape[0])
    return cross_entropy + me_max_weight * me_max, {"cross_entropy": cross_entropy.detach(),
                                                    "me_max": me_max.detach()}
