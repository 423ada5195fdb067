"""Canonical correlation objectives: DCCA's total correlation and the DCCAE objective.

- :func:`cca_correlation`: the total canonical correlation of two views' features, the objective of Deep CCA
  (Andrew, Arora, Bilmes, Livescu 2013, ICML, "Deep Canonical Correlation Analysis").
- :func:`dccae_loss`: Deep Canonically Correlated Autoencoders, ``−corr + λ·(reconstruction errors)``
  (Wang, Arora, Livescu, Bilmes 2015, ICML, "On Deep Multi-View Representation Learning"; extended
  version arXiv:1602.01024).

The encoders f, g and the decoders p, q belong to the method; these are pure functions of their outputs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from selfsup.distributed import gather as gather_ranks
from selfsup.losses.precision import fp32_loss


def _whitener(x: Tensor, r: float, view: int) -> Tensor:
    """Lower Cholesky factor L of Σ = x̄ᵀx̄ / (N − 1) + r·I for centred x̄ (N, d), float64."""
    cov = x.T @ x / (x.shape[0] - 1) + r * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        raise ValueError(f"cca_correlation: the covariance of view {view} is singular (a constant or linearly "
                         f"dependent feature); pass r{view} > 0 to regularise it")
    return chol


@fp32_loss
def cca_correlation(h1: Tensor, h2: Tensor, r1: float = 0.0, r2: float = 0.0, k: int | None = None,
                    gather: bool = False) -> Tensor:
    """Total correlation of the top-k canonical pairs of h1 (B, d1) and h2 (B, d2): a scalar in [0, k].

    As Andrew et al. 2013 compute it: centre each view over the batch; Σ11 = H̄1ᵀH̄1/(B − 1) + r1·I,
    Σ22 likewise with r2, Σ12 = H̄1ᵀH̄2/(B − 1); T = Σ11^{-1/2} Σ12 Σ22^{-1/2}; the result is the sum of the
    k largest singular values of T (its trace norm when k = min(d1, d2), the default). With r1 = r2 = 0 these
    are the canonical correlations of the batch, invariant to any invertible affine map of either view.

    Computed in float64: with r = 0 the covariances of a batch barely larger than d are ill-conditioned, and
    d×d factorisations cost nothing beside the networks. Σ^{-1/2} is replaced by the inverse Cholesky factor
    L⁻¹ (Σ = LLᵀ): L⁻¹ = O·Σ^{-1/2} for an orthogonal O, so T's singular values are unchanged, while the
    gradient avoids eigh's, which divides by eigenvalue gaps and comes out wrong or NaN when two eigenvalues
    meet (already-whitened features, a large r; checked in tests/losses/test_cca.py). Differentiable wherever the k-th and (k+1)-th singular
    values differ (always for the trace norm of a non-singular T).

    gather: the batch statistics use the rows of every process (gathered with gradients through
    :func:`selfsup.distributed.gather`), so each process computes the single-process value of the combined batch.
    """
    if h1.ndim != 2 or h2.ndim != 2 or h1.shape[0] != h2.shape[0]:
        raise ValueError(f"cca_correlation: expected h1 (B, d1) and h2 (B, d2) with the same B, got "
                         f"{tuple(h1.shape)} and {tuple(h2.shape)}")
    if r1 < 0 or r2 < 0:
        raise ValueError(f"cca_correlation: the covariance regularisers must be ≥ 0, got r1={r1}, r2={r2}")
    if gather:
        h1, h2 = gather_ranks(h1), gather_ranks(h2)
    n, d1, d2 = h1.shape[0], h1.shape[1], h2.shape[1]
    for view, r, d in ((1, r1, d1), (2, r2, d2)):
        if r == 0 and n <= d:
            raise ValueError(f"cca_correlation: a batch of {n} gives view {view}'s centred {d}×{d} covariance rank "
                             f"at most {n - 1}, so it is singular; use a batch larger than {d} or pass r{view} > 0")
    top = min(d1, d2) if k is None else k
    if not 1 <= top <= min(d1, d2):
        raise ValueError(f"cca_correlation: k must be in [1, {min(d1, d2)}] (the smaller feature width), got {k}")
    x1 = h1.double() - h1.double().mean(dim=0, keepdim=True)
    x2 = h2.double() - h2.double().mean(dim=0, keepdim=True)
    l1, l2 = _whitener(x1, r1, 1), _whitener(x2, r2, 2)
    s12 = x1.T @ x2 / (n - 1)
    t = torch.linalg.solve_triangular(l1, s12, upper=False)  # L1⁻¹ Σ12
    t = torch.linalg.solve_triangular(l2, t.T, upper=False).T  # L1⁻¹ Σ12 L2⁻ᵀ
    return torch.linalg.svdvals(t)[:top].sum().to(h1.dtype)


def reconstruction_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """(1/N) Σ_i ‖x_i − x̂_i‖²: squared error summed over every non-batch dimension, averaged over samples."""
    if x.shape != x_hat.shape or x.ndim < 2:
        raise ValueError(f"reconstruction_error: expected a batch and its reconstruction of one shape (N, …), got "
                         f"{tuple(x.shape)} and {tuple(x_hat.shape)}")
    return (x - x_hat).pow(2).flatten(1).sum(dim=1).mean()


def dccae_loss(h1: Tensor, h2: Tensor, x1: Tensor, recon1: Tensor, x2: Tensor, recon2: Tensor, *, lam: float,
               r1: float, r2: float, k: int | None = None, gather: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """DCCAE (Wang et al. 2015): ``−corr(f(x1), g(x2)) + λ·(1/N)Σ_i(‖x1_i − p(f(x1_i))‖² + ‖x2_i − q(g(x2_i))‖²)``.

    h1 (B, d1), h2 (B, d2): the encoders' features f(x1), g(x2); x1, x2: the inputs (B, …); recon1, recon2:
    the decoders' reconstructions p(h1), q(h2), shaped like the inputs. The correlation term is
    :func:`cca_correlation` of the top k canonical pairs (the paper's L = k projection directions; the
    constrained maximisation over the projections U, V equals that total correlation, which DCCA optimises in closed
    form), with covariance regularisers r1, r2 (the paper's r_x, r_y). The paper writes both terms as
    sums over the N samples divided by N: the reconstruction errors are squared l2 norms per sample
    (summed over pixels, not averaged), averaged over the batch. λ > 0 trades them off; the paper tunes
    λ, r_x and r_y per dataset on a grid and states no default, hence no default here. Returns
    (loss, {"correlation", "reconstruction"}) with the parts detached for logging.
    """
    if lam < 0:
        raise ValueError(f"dccae_loss: lam (λ, the reconstruction weight) must be ≥ 0, got {lam}")
    corr = cca_correlation(h1, h2, r1, r2, k, gather=gather)
    recon = reconstruction_error(x1, recon1) + reconstruction_error(x2, recon2)
    return -corr + lam * recon, {"correlation": corr.detach(), "reconstruction": recon.detach()}
