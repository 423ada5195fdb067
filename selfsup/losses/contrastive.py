"""Contrastive losses: one InfoNCE that SimCLR, MoCo and NNCLR share.

InfoNCE (van den Oord et al. 2018, arXiv:1807.03748): for each query, cross-entropy of picking its
positive key among the candidates, with cosine similarities scaled by 1/τ. NT-Xent (SimCLR, Chen et al.
2020, arXiv:2002.05709, eq. 1) is its symmetric form in which the other views in the batch are negatives too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.train.distributed import gather as gather_ranks
from selfsup.train.distributed import rank


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
