"""Contrastive losses: one InfoNCE that SimCLR, MoCo and NNCLR share.

InfoNCE (van den Oord et al. 2018, arXiv:1807.03748): for each query, cross-entropy of picking its
positive key among the candidates, with cosine similarities scaled by 1/τ. NT-Xent (SimCLR, Chen et al.
2020, arXiv:2002.05709, eq. 1) is its symmetric form in which the other views in the batch are negatives too.
DCL (Yeh et al. 2022, arXiv:2110.06848) is NT-Xent with the positive removed from the denominator.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses.precision import fp32_loss
from selfsup.distributed import gather as gather_ranks
from selfsup.distributed import gather_no_grad
from selfsup.distributed import rank


@fp32_loss
def info_nce(query: Tensor, key: Tensor, temperature: float, negatives: Tensor | None = None,
             in_batch: bool = True, query_negatives: bool = False, gather: bool = False) -> Tensor:
    """Mean InfoNCE over the queries.

    query, key: (B, D), row i of ``key`` is the positive of row i of ``query``; both are l2-normalised here.
    negatives: (K, D) extra negatives (a queue or memory bank), no gradient expected.
    in_batch: the other keys of the batch are negatives too (SimCLR, MoCo v3); False gives MoCo v2's
        ``[q·k⁺, q·queue]`` logits.
    query_negatives: the other queries are negatives too (NT-Xent's 2N − 2 negatives).
    gather: take keys (and queries, for ``query_negatives``) from every process, with gradients.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    q = F.normalize(query, dim=1)
    k = F.normalize(key, dim=1)
    b = q.shape[0]
    if in_batch:
        k_all = gather_ranks(k) if gather else k
        offset = rank() * b if gather else 0
        labels = torch.arange(b, device=q.device) + offset
        logits = [q @ k_all.T]
        if query_negatives:
            q_all = gather_ranks(q) if gather else q
            self_sim = q @ q_all.T
            self_mask = torch.zeros_like(self_sim, dtype=torch.bool)
            self_mask[torch.arange(b), labels] = True
            logits.append(self_sim.masked_fill(self_mask, float("-inf")))
    else:
        labels = torch.zeros(b, dtype=torch.long, device=q.device)
        logits = [(q * k).sum(dim=1, keepdim=True)]
    if negatives is not None:
        logits.append(q @ F.normalize(negatives, dim=1).to(q.dtype).T)
    return F.cross_entropy(torch.cat(logits, dim=1) / temperature, labels)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5, gather: bool = False) -> Tensor:
    """NT-Xent over 2B views: each view's positive is its pair, its 2B − 2 negatives every other view.

    z1, z2: (B, D) projections of the two views. Equals the paper's
    ``1/2N Σ_k [ℓ(2k−1, 2k) + ℓ(2k, 2k−1)]``.
    """
    return 0.5 * (info_nce(z1, z2, temperature, query_negatives=True, gather=gather)
                  + info_nce(z2, z1, temperature, query_negatives=True, gather=gather))


def vmf_weights(z1: Tensor, z2: Tensor, sigma: float = 0.5, gather: bool = False) -> Tensor:
    """DCLW's negative von Mises–Fisher weight of each positive pair (Yeh et al. 2022, arXiv:2110.06848, §3.2).

    ``w_i = 2 − exp(s_i/σ) / E_j[exp(s_j/σ)] = 2 − N·softmax(s/σ)_i`` with ``s_i = cos(z1_i, z2_i)`` and N the
    (global) batch: the weights average to 1, easy pairs (high similarity) get less than 1, hard pairs up
    to 2. z1, z2: (B, D) → (B,). Detached: the weight rescales the positive term's gradient, it is not
    itself optimised (as lightly's DCLWLoss). ``gather`` takes the expectation over every process's pairs.
    """
    if sigma <= 0:
        raise ValueError(f"vMF weighting sigma must be > 0, got {sigma}")
    s = (F.normalize(z1.detach(), dim=1) * F.normalize(z2.detach(), dim=1)).sum(dim=1) / sigma
    s_all = gather_no_grad(s) if gather else s
    w_all = 2 - s_all.shape[0] * torch.softmax(s_all, dim=0)
    if not gather:
        return w_all
    b = s.shape[0]
    return w_all[rank() * b : (rank() + 1) * b]


@fp32_loss
def dcl_loss(z1: Tensor, z2: Tensor, temperature: float = 0.1,
             weight_fn: Callable[[Tensor, Tensor], Tensor] | None = None, gather: bool = False) -> Tensor:
    """Decoupled contrastive loss (Yeh et al. 2022, arXiv:2110.06848, eq. 6): NT-Xent without the positive
    pair in the denominator, averaged over both views of every image.

    ``L_i = −w_i·s(z1_i, z2_i)/τ + log Σ_{l∈{1,2}, j≠i} exp(s(z1_i, z_l_j)/τ)`` (and the same with the views
    swapped), s the cosine similarity: the 2B − 2 negatives of NT-Xent, but not the positive.
    z1, z2: (B, D) projections of the two views. weight_fn: maps the l2-normalised (z1, z2) to (B,) positive
    weights (``vmf_weights`` gives DCLW); None gives DCL (w = 1). gather: negatives from every process.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"dcl_loss needs two (B, D) tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    weight = None if weight_fn is None else weight_fn(a, b)
    return 0.5 * (_dcl_one_way(a, b, weight, temperature, gather) + _dcl_one_way(b, a, weight, temperature, gather))


def _dcl_one_way(q: Tensor, k: Tensor, weight: Tensor | None, temperature: float, gather: bool) -> Tensor:
    """Mean over the rows of q of the DCL term; q, k: (B, D) unit rows, k[i] the positive of q[i]."""
    n = q.shape[0]
    q_all = gather_ranks(q) if gather else q
    k_all = gather_ranks(k) if gather else k
    rows = torch.arange(n, device=q.device)
    cols = rows + (rank() * n if gather else 0)
    sim_k = q @ k_all.T / temperature
    sim_q = q @ q_all.T / temperature
    own = torch.zeros_like(sim_k, dtype=torch.bool)
    own[rows, cols] = True  # the positive in sim_k, the view itself in sim_q
    positive = sim_k[rows, cols]
    if weight is not None:
        positive = weight.to(positive.dtype) * positive
    negatives = torch.cat([sim_k.masked_fill(own, float("-inf")), sim_q.masked_fill(own, float("-inf"))], dim=1)
    return (torch.logsumexp(negatives, dim=1) - positive).mean()
