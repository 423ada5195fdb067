"""Collapse diagnostics on a batch of embeddings.

- spread: mean per-dimension std of l2-normalised embeddings; ≈ 1/√D when they spread over the
  sphere, → 0 under complete collapse (SimSiam, Chen & He 2020, arXiv:2011.10566, §4 fig. 2).
- effective rank (RankMe, Garrido et al. 2023, arXiv:2210.02885): exp of the entropy of the
  normalised singular values; ≪ D under dimensional collapse.
- alignment and uniformity (Wang & Isola 2020, arXiv:2005.10242, eqs. 4–5).
- energy gap: mean cosine similarity of positive pairs minus that of the other pairs in the batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def spread(z: Tensor) -> float:
    return float(F.normalize(z.float(), dim=1).std(dim=0).mean())


def healthy_spread(dim: int) -> float:
    return 1.0 / math.sqrt(dim)


def effective_rank(z: Tensor, eps: float = 1e-7) -> float:
    s = torch.linalg.svdvals(z.float())
    p = s / (s.sum() + eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> float:
    a, b = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    return float((a - b).norm(dim=1).pow(alpha).mean())


def uniformity(z: Tensor, t: float = 2.0) -> float:
    x = F.normalize(z.float(), dim=1)
    return float(torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log())


def energy_gap(z1: Tensor, z2: Tensor) -> float:
    """mean cos(z1_i, z2_i) − mean over i ≠ j of cos(z1_i, z2_j)."""
    a, b = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    sim = a @ b.T
    n = sim.shape[0]
    if n < 2:
        return float("nan")
    pos = sim.diagonal().mean()
    neg = (sim.sum() - sim.diagonal().sum()) / (n * n - n)
    return float(pos - neg)


def batch_diagnostics(z: Tensor, z_pair: Tensor | None = None) -> dict[str, float]:
    out = {"spread": spread(z), "spread_healthy": healthy_spread(z.shape[1]), "rank": effective_rank(z)}
    if z_pair is not None:
        out["alignment"] = alignment(z, z_pair)
        out["uniformity"] = uniformity(z)
        out["energy_gap"] = energy_gap(z, z_pair)
    return out
