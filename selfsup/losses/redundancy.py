"""Redundancy-reduction losses: Barlow Twins, VICReg and W-MSE.

All three make the embeddings of two views of one image agree, and prevent collapse by
constraining second-order statistics of the embedding over the batch instead of contrasting
with negatives: Barlow Twins drives the cross-correlation matrix to the identity, VICReg keeps each
dimension's variance up and the covariances down, W-MSE whitens the batch before comparing.

With ``gather=True`` the batch statistics use the embeddings of every process, gathered with
gradients through :func:`selfsup.distributed.gather`, so the loss equals the one of a single
process holding the global batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses.precision import fp32_loss  # batch statistics and D×D (cross-)covariances in fp32
from selfsup.distributed import gather as gather_ranks


def _off_diagonal(m: Tensor) -> Tensor:
    """The D·(D − 1) off-diagonal entries of a square (D, D) matrix, flattened, in row-major order; of a stack
    (…, D, D) of them, (…, D·(D − 1)), one row per matrix (VICRegL's per-match-slot covariances).

    Without its first entry (the first diagonal one), the flat matrix is D − 1 rows of D + 1 entries, each ending
    with the next diagonal entry: dropping that column leaves exactly the off-diagonal entries, with no boolean
    mask: at D = 2,048 the masked selection took ~107 ms forward and backward against 13–16 ms (2 CPU threads);
    VICReg's whole step became 1.43× faster natively (bf16) and 1.31× in AVX2-limited fp32, Barlow Twins' 1.09×
    and 1.14× (``benchmarks/step/README.md``). For a (D, D) matrix the operations are the 2-D ones, unchanged."""
    d = m.shape[-1]
    return m.flatten(-2)[..., 1:].unflatten(-1, (d - 1, d + 1))[..., :-1].flatten(-2)


def _check_batch(z1: Tensor, z2: Tensor, name: str) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"{name}: expected two (B, D) embeddings of the same shape, got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError(f"{name}: batch statistics need at least 2 samples, got {z1.shape[0]}")


# --- Barlow Twins -------------------------------------------------------------------------------

def cross_correlation(z1: Tensor, z2: Tensor, eps: float = 1e-5, gather: bool = False) -> Tensor:
    """(D, D) cross-correlation of the two views' embeddings along the batch (arXiv:2103.03230, eq. 2).

    z1, z2: (B, D). Each dimension is standardised over the batch with the population variance
    (what the reference code's affine-free BatchNorm does), so ``C_ij`` is the Pearson correlation
    of dimension i of view 1 with dimension j of view 2. ``eps`` is added to the variance (as
    BatchNorm's); with ``eps=0`` the result is exactly invariant to a per-dimension affine map.
    """
    _check_batch(z1, z2, "barlow twins")
    if gather:
        z1, z2 = gather_ranks(z1), gather_ranks(z2)

    def standardise(z: Tensor) -> Tensor:
        var, mean = torch.var_mean(z, dim=0, correction=0)
        return (z - mean) / torch.sqrt(var + eps)

    return standardise(z1).T @ standardise(z2) / z1.shape[0]


@fp32_loss
def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = 5e-3, eps: float = 1e-5,
                      gather: bool = False) -> Tensor:
    """Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij² (Zbontar et al. 2021, arXiv:2103.03230, eq. 1).

    z1, z2: (B, D) projector outputs of the two views. The on-diagonal term makes the views
    invariant, the off-diagonal term decorrelates the dimensions. λ = 5·10⁻³ is the paper's value.
    """
    if lambd < 0:
        raise ValueError(f"barlow twins: lambd (the off-diagonal weight λ) must be ≥ 0, got {lambd}")
    c = cross_correlation(z1, z2, eps, gather)
    return (torch.diagonal(c) - 1).pow(2).sum() + lambd * _off_diagonal(c).pow(2).sum()


# --- VICReg ---------------------------------------------------------------------------------------

def invariance_loss(z1: Tensor, z2: Tensor) -> Tensor:
    """s(Z, Z'): mean squared error over the B·D entries of the two (B, D) embeddings
    (arXiv:2105.04906, eq. 5; the mean over dimensions too, as the paper's Algorithm 1)."""
    return F.mse_loss(z1, z2)


def variance_loss(z: Tensor, gamma: float = 1.0, eps: float = 1e-4) -> Tensor:
    """v(Z) = 1/D Σ_j max(0, γ − √(Var(z^j) + ε)) over the (B, D) embedding (arXiv:2105.04906, eq. 1–2).

    The hinge on the standard deviation (not the variance) keeps gradients from vanishing near
    collapse; Var is the unbiased batch variance. A stack (…, B, D) of independent batches gives the mean of
    their v(·) (VICRegL's per-match-slot statistics, arXiv:2210.01571).
    """
    std = torch.sqrt(z.var(dim=-2) + eps)
    return F.relu(gamma - std).mean()


def covariance_loss(z: Tensor) -> Tensor:
    """c(Z) = 1/D Σ_{i≠j} C(Z)_ij², C the unbiased (D, D) covariance of the (B, D) embedding
    (arXiv:2105.04906, eq. 3–4). A stack (…, B, D) of independent batches gives the mean of their c(·)."""
    b, d = z.shape[-2:]
    zc = z - z.mean(dim=-2, keepdim=True)
    cov = zc.mT @ zc / (b - 1)
    return (_off_diagonal(cov).pow(2).sum(-1) / d).mean()


def check_vicreg_settings(sim_weight: float, var_weight: float, cov_weight: float, gamma: float, eps: float) -> None:
    """ValueError for weights or ε below 0 and γ ≤ 0 (shared by the loss and the method's constructor)."""
    for key, value in (("sim_weight", sim_weight), ("var_weight", var_weight), ("cov_weight", cov_weight),
                       ("eps", eps)):
        if value < 0:
            raise ValueError(f"vicreg: {key} must be ≥ 0, got {value}")
    if gamma <= 0:
        raise ValueError(f"vicreg: gamma (the target standard deviation) must be > 0, got {gamma}")


@fp32_loss
def vicreg_loss(z1: Tensor, z2: Tensor, sim_weight: float = 25.0, var_weight: float = 25.0,
                cov_weight: float = 1.0, gamma: float = 1.0, eps: float = 1e-4,
                gather: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """λ s(Z, Z') + μ [v(Z) + v(Z')] / 2 + ν [c(Z) + c(Z')] (Bardes et al. 2022, arXiv:2105.04906).

    z1, z2: (B, D) expander outputs. λ = μ = 25, ν = 1, γ = 1, ε = 10⁻⁴ are the paper's values.

    The weighting follows the authors' code (facebookresearch/vicreg ``main_vicreg.py``, whose runs
    produced the published 25/25/1 weights; lightly's ``VICRegLoss`` does the same), not the literal
    eq. 6: the variance term is the *mean* of the two branches' hinges (``std_loss = mean(relu(1 −
    std_x)) / 2 + mean(relu(1 − std_y)) / 2``), while the covariance term is the *sum* of the two
    branches' c(·), each already divided by D. Summing the variance hinges, as eq. 6 reads, doubles
    μ against the weights the paper tuned.

    With ``gather`` the variance and covariance terms use the embeddings of every process; the
    invariance term is per sample, so it stays local (as the reference code). Returns the loss and
    its three unweighted terms as they enter it (variance averaged over the branches, covariance
    summed), detached, for logging.
    """
    _check_batch(z1, z2, "vicreg")
    check_vicreg_settings(sim_weight, var_weight, cov_weight, gamma, eps)
    inv = invariance_loss(z1, z2)
    if gather:
        z1, z2 = gather_ranks(z1), gather_ranks(z2)
    var = (variance_loss(z1, gamma, eps) + variance_loss(z2, gamma, eps)) / 2
    cov = covariance_loss(z1) + covariance_loss(z2)
    loss = sim_weight * inv + var_weight * var + cov_weight * cov
    return loss, {"invariance": inv.detach(), "variance": var.detach(), "covariance": cov.detach()}


# --- W-MSE ----------------------------------------------------------------------------------------

def whiten(x: Tensor, eps: float = 0.0) -> Tensor:
    """W (x − μ) with W = L⁻¹, L L^T = Σ + εI the Cholesky factor of the (D, D) unbiased covariance
    (Ermolov et al. 2021, arXiv:2007.06346).

    x: (N, D) with N > D (the covariance must have full rank). With ε = 0 the output has zero mean
    and identity covariance. A covariance that is not positive definite (a collapsed embedding)
    gives NaN rather than an exception, so a training loop can skip the step and report it.
    """
    n, d = x.shape
    if n <= d:
        raise ValueError(f"whitening needs more samples than dimensions (a full-rank covariance), "
                         f"got {n} samples of dimension {d}")
    xc = x - x.mean(dim=0)
    cov = xc.T @ xc / (n - 1) + eps * torch.eye(d, dtype=x.dtype, device=x.device)
    chol, info = torch.linalg.cholesky_ex(cov)
    white = torch.linalg.solve_triangular(chol, xc.T, upper=False).T
    return torch.where(info == 0, white, torch.full_like(white, float("nan")))


@fp32_loss
def wmse_loss(z1: Tensor, z2: Tensor, w_size: int = 128, w_iter: int = 1, eps: float = 1e-4,
              gather: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """Mean ‖ŵ1 − ŵ2‖² over positives, ŵ the l2-normalised whitened embedding (arXiv:2007.06346, Algorithm 1).

    z1, z2: (B, D) projections of two views. Each of ``w_iter`` rounds draws a random permutation
    (from ``generator``, on the CPU) and splits it with ``tensor_split`` into B // w_size sub-batches
    of at least ``w_size`` samples; each view is whitened within every sub-batch (the same samples
    for both views). ``w_size`` must exceed D. With ``gather`` the sub-batches are drawn from the
    embeddings of every process (each process draws its own split, so the gradient is that of the
    loss averaged over the processes' splits).
    """
    _check_batch(z1, z2, "w-mse")
    if w_iter < 1:
        raise ValueError(f"w-mse: w_iter must be ≥ 1, got {w_iter}")
    if eps < 0:
        raise ValueError(f"w-mse: eps must be ≥ 0, got {eps}")
    if gather:
        z1, z2 = gather_ranks(z1), gather_ranks(z2)
    b, d = z1.shape
    if w_size <= d:
        raise ValueError(f"w-mse: the whitening sub-batch (w_size={w_size}) must be larger than the embedding "
                         f"dimension {d} for a full-rank covariance")
    if b < w_size:
        raise ValueError(f"w-mse: batch of {b} is smaller than the whitening sub-batch w_size={w_size}")
    total = z1.new_zeros(())
    for _ in range(w_iter):
        perm = torch.randperm(b, generator=generator).to(z1.device)
        for idx in perm.tensor_split(b // w_size):
            w1 = F.normalize(whiten(z1[idx], eps), dim=1)
            w2 = F.normalize(whiten(z2[idx], eps), dim=1)
            total = total + (w1 - w2).pow(2).sum()
    return total / (w_iter * b)
