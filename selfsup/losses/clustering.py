"""Clustering losses: Sinkhorn–Knopp codes and swapped prediction (SwAV), k-means pseudo-labels (DeepCluster v2).

Caron, Misra, Mairal, Goyal, Bojanowski, Joulin. Unsupervised Learning of Visual Features by Contrasting
Cluster Assignments. NeurIPS 2020, arXiv:2006.09882 (§3.1, Algorithm 1; appendix A for DeepCluster-v2).

Notation: B samples, K prototypes (clusters), V crops, G global crops (those codes are computed for).
Codes are targets: they are computed without gradient and enter the losses as constants.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses.precision import at_least_f32  # softmaxes and exp(S/ε) in bf16 lose the small codes
from selfsup.distributed import all_reduce_mean, gather_no_grad, world_size


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3, gather: bool = False) -> Tensor:
    """Soft codes Q (B, K) for prototype scores (B, K), by Sinkhorn–Knopp on exp(scores / ε).

    Solves the entropic transport problem of arXiv:2006.09882 §3.1 ("computing codes online"):
    Q = diag(u) exp(S/ε) diag(v), every prototype receiving an equal share of the batch (equipartition). Each iteration rescales the
    prototype (column) sums to N/K, then the sample (row) sums to 1, so on return each row is a
    distribution over prototypes and the columns sum to N/K up to the last row rescaling (N: rows of the
    global batch). The same routine gives DINOv2's teacher targets (``sinkhorn_knopp_teacher`` of
    arXiv:2304.07193's code): ``scores`` = teacher logits, ``epsilon`` = teacher temperature, 3 iterations.
    Three iterations only approach equipartition: on cosine logits at ε = 0.07 the column sums were measured
    up to ~25% off N/K after 3, ~2% after 10 (tests/losses/test_sinkhorn_teacher.py); the rows are exact.

    gather: the rows are split over processes; the total, the column sums and the row count are summed over
    all of them (``all_reduce_mean`` × world) and exp is shifted by the global maximum, so every process
    returns its rows of the codes of the combined batch. Processes may hold different numbers of rows,
    none included (DINOv2's masked patch tokens); every process must call it. Computed in at least float32.
    """
    if epsilon <= 0:
        raise ValueError(f"sinkhorn_knopp: epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"sinkhorn_knopp: iterations must be ≥ 1, got {iterations}")
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"sinkhorn_knopp: scores must be a (B, K) matrix with K ≥ 1, got shape {tuple(scores.shape)}")
    s = at_least_f32(scores.detach())
    world = world_size() if gather else 1

    def total(x: Tensor) -> Tensor:
        return all_reduce_mean(x) * world if gather else x

    n = total(torch.tensor(float(s.shape[0]), dtype=s.dtype, device=s.device))  # rows of the global batch
    if float(n) == 0:  # nothing to assign anywhere (every process agrees, so no collective is skipped by one)
        return s.clone()
    # Any constant shared by all processes cancels in the first normalisation; the global maximum keeps exp
    # finite (a process without rows offers −inf).
    local_max = s.max().reshape(1) if s.shape[0] else s.new_full((1,), float("-inf"))
    shift = gather_no_grad(local_max).max() if gather else local_max[0]
    q = torch.exp((s - shift) / epsilon)
    q /= total(q.sum())
    k = q.shape[1]
    tiny = torch.finfo(q.dtype).tiny
    for _ in range(iterations):
        q /= total(q.sum(dim=0, keepdim=True)).clamp_min(tiny) * k  # each prototype holds mass 1/K
        q /= q.sum(dim=1, keepdim=True).clamp_min(tiny) * n  # each sample holds mass 1/N
    return q * n


def swav_loss(scores: Tensor, codes: Tensor, temperature: float = 0.1) -> Tensor:
    """Swapped prediction (arXiv:2006.09882 §3.1 eq. 1–2, over multi-crop views as in §3.2).

    scores: (V, B, K) prototype scores z·c of every crop (cosines); crops 0…G−1 are the global crops.
    codes: (G, B, K) targets of the global crops, rows summing to 1 (from :func:`sinkhorn_knopp`).
    Each global crop's code is predicted by every other crop, ℓ = −Σ_k q_k log softmax(z·c / τ)_k;
    the mean over predicting crops, over samples and over the G codes.
    """
    if temperature <= 0:
        raise ValueError(f"swav_loss: temperature must be > 0, got {temperature}")
    if scores.ndim != 3 or codes.ndim != 3 or codes.shape[1:] != scores.shape[1:] or codes.shape[0] > scores.shape[0]:
        raise ValueError(f"swav_loss: expected scores (V, B, K) and codes (G ≤ V, B, K), got {tuple(scores.shape)} "
                         f"and {tuple(codes.shape)}")
    if scores.shape[0] < 2:
        raise ValueError("swav_loss: swapped prediction needs at least 2 crops")
    log_p = F.log_softmax(at_least_f32(scores) / temperature, dim=2)  # (V, B, K)
    codes = codes.detach().to(log_p.dtype)
    per_code = []
    for g in range(codes.shape[0]):
        others = torch.cat([log_p[:g], log_p[g + 1 :]])  # (V − 1, B, K)
        per_code.append(-(codes[g] * others).sum(dim=2).mean())
    return torch.stack(per_code).mean()


def deepcluster_loss(scores: Tensor, targets: Tensor, temperature: float = 0.1) -> Tensor:
    """Cross-entropy of every crop's prototype scores against its sample's k-means cluster (DeepCluster-v2,
    arXiv:2006.09882 appendix A). scores: (V, B, K) cosines to the centroids; targets: (B,) cluster ids."""
    if temperature <= 0:
        raise ValueError(f"deepcluster_loss: temperature must be > 0, got {temperature}")
    if scores.ndim != 3 or targets.shape != scores.shape[1:2]:
        raise ValueError(f"deepcluster_loss: expected scores (V, B, K) and targets (B,), got {tuple(scores.shape)} "
                         f"and {tuple(targets.shape)}")
    v, b, k = scores.shape
    return F.cross_entropy(at_least_f32(scores).reshape(v * b, k) / temperature, targets.repeat(v))


@torch.no_grad()
def spherical_kmeans(x: Tensor, k: int, iterations: int = 10, generator: torch.Generator | None = None
                     ) -> tuple[Tensor, Tensor]:
    """Cosine k-means (DeepCluster-v2's clustering of the memory): returns centroids (K, D), unit norm,
    and assignments (N,) of the rows of x (N, D) to their most similar centroid.

    Seeding is k-means++ (Arthur & Vassilvitskii 2007) on the cosine distance 1 − cos, where the reference
    draws K random rows: random seeds often leave two centroids in one cluster and Lloyd's iterations never
    separate them. With N < K some seeds repeat and their clusters stay empty; an empty cluster keeps its
    centroid. ``iterations`` M-steps, each followed by an E-step.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"spherical_kmeans: x must be a non-empty (N, D) matrix, got shape {tuple(x.shape)}")
    if k < 1 or iterations < 0:
        raise ValueError(f"spherical_kmeans: need k ≥ 1 and iterations ≥ 0, got k={k}, iterations={iterations}")
    x = F.normalize(x.float(), dim=1)
    centroids = _kmeans_pp_seeds(x, k, generator)
    assign = (x @ centroids.T).argmax(dim=1)
    for _ in range(iterations):
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0
        centroids[filled] = F.normalize(sums[filled], dim=1)
        assign = (x @ centroids.T).argmax(dim=1)
    return centroids, assign


def _kmeans_pp_seeds(x: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """K rows of unit-norm x (N, D), each drawn with probability ∝ 1 − cos to the nearest seed so far, which is
    half the squared Euclidean distance on the sphere: k-means++'s D² sampling."""
    n = x.shape[0]
    picks = [int(torch.randint(n, (1,), generator=generator))]
    dist = (1 - x @ x[picks[0]]).clamp_min(0)
    for _ in range(1, k):
        weights = dist if bool(dist.sum() > 0) else torch.ones_like(dist)  # every row already a seed
        picks.append(int(torch.multinomial(weights.cpu(), 1, generator=generator)))
        dist = torch.minimum(dist, (1 - x @ x[picks[-1]]).clamp_min(0))
    return x[picks].clone()
