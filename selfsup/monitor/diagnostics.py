"""Collapse diagnostics on a batch of embeddings.

- spread: mean per-dimension std of l2-normalised embeddings; ≈ 1/√D when they spread over the
  sphere, → 0 under complete collapse (SimSiam, Chen & He 2020, arXiv:2011.10566, §4 fig. 2).
- effective rank (RankMe, Garrido et al. 2023, arXiv:2210.02885): exp of the entropy of the
  normalised singular values; ≪ D under dimensional collapse.
- alignment and uniformity (Wang & Isola 2020, arXiv:2005.10242, eqs. 4–5).
- energy gap: mean cosine similarity of positive pairs minus that of the other pairs in the batch.

Every function takes detached (B, D) embeddings and returns a Python float; a degenerate input
(non-finite values, fewer than two rows where pairs are needed) gives NaN rather than an error, since
these run inside the training loop and must never stop it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def spread(z: Tensor) -> float:
    """Mean over the D dimensions of the std (over the batch) of the l2-normalised (B, D) embeddings."""
    return float(F.normalize(z.float(), dim=1).std(dim=0).mean())


def healthy_spread(dim: int) -> float:
    """1/√D: the spread of embeddings distributed uniformly on the unit sphere in D dimensions."""
    return 1.0 / math.sqrt(dim)


def effective_rank(z: Tensor, eps: float = 1e-7) -> float:
    """RankMe of (B, D) embeddings: exp(−Σ p_k log p_k), p_k = σ_k / ‖σ‖₁ + ε (arXiv:2210.02885, eq. 1).

    In [1, min(B, D)]: k for a rank-k matrix with equal singular values; 0 for the zero matrix.
    """
    z = z.float()
    if not bool(torch.isfinite(z).all()):
        return float("nan")  # the SVD does not converge on NaN/Inf
    s = torch.linalg.svdvals(z)
    if float(s.sum()) == 0.0:
        return 0.0
    p = s / (s.sum() + eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> float:
    """E ‖f(x) − f(y)‖^α over positive pairs, rows of (B, D) z1 and z2 after l2 normalisation; 0 is perfect."""
    a, b = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    return float((a - b).norm(dim=1).pow(alpha).mean())


def uniformity(z: Tensor, t: float = 2.0) -> float:
    """log E exp(−t ‖f(x) − f(y)‖²) over distinct pairs of rows of (B, D) z after l2 normalisation.

    0 when every row is the same point (collapse), lower is more uniform; NaN for B < 2.
    """
    if z.shape[0] < 2:
        return float("nan")
    x = F.normalize(z.float(), dim=1)
    return float(torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log())


def energy_gap(z1: Tensor, z2: Tensor) -> float:
    """mean cos(z1_i, z2_i) − mean over i ≠ j of cos(z1_i, z2_j), for (B, D) z1, z2; NaN for B < 2."""
    a, b = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    sim = a @ b.T
    n = sim.shape[0]
    if n < 2:
        return float("nan")
    pos = sim.diagonal().mean()
    neg = (sim.sum() - sim.diagonal().sum()) / (n * n - n)
    return float(pos - neg)


def batch_diagnostics(z: Tensor, z_pair: Tensor | None = None) -> dict[str, float]:
    """spread, spread_healthy and rank of (B, D) z; alignment, uniformity and energy_gap too given its positives."""
    out = {"spread": spread(z), "spread_healthy": healthy_spread(z.shape[1]), "rank": effective_rank(z)}
    if z_pair is not None:
        out["alignment"] = alignment(z, z_pair)
        out["uniformity"] = uniformity(z)
        out["energy_gap"] = energy_gap(z, z_pair)
    return out
