"""DCCA's total correlation and the DCCAE objective: against an independent CCA (numpy: eigh inverse square
roots and the SVD of the whitened cross-covariance, as Andrew et al. 2013 write it; and scikit-learn's
``CCA``), invariance to invertible affine maps, float64 gradcheck (also where eigenvalues coincide),
and errors for singular settings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.losses.cca import cca_correlation, dccae_loss, reconstruction_error

DT = torch.float64


def correlated_views(n=200, d1=4, d2=4, shared=3, noise=0.5, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, shared))
    x = z @ rng.normal(size=(shared, d1)) + noise * rng.normal(size=(n, d1))
    y = z @ rng.normal(size=(shared, d2)) + noise * rng.normal(size=(n, d2))
    return x, y


def numpy_canonical_correlations(x, y, r1=0.0, r2=0.0):
    """Singular values of Σ11^{-1/2} Σ12 Σ22^{-1/2}, inverse square roots by eigendecomposition."""
    x, y = x - x.mean(0), y - y.mean(0)
    n = len(x)

    def inv_sqrt(s):
        w, v = np.linalg.eigh(s)
        return v @ np.diag(w ** -0.5) @ v.T

    s11 = x.T @ x / (n - 1) + r1 * np.eye(x.shape[1])
    s22 = y.T @ y / (n - 1) + r2 * np.eye(y.shape[1])
    return np.linalg.svd(inv_sqrt(s11) @ (x.T @ y / (n - 1)) @ inv_sqrt(s22), compute_uv=False)


@pytest.mark.parametrize("d1,d2,r1,r2,k", [(4, 4, 0.0, 0.0, None), (5, 3, 0.0, 0.0, None), (4, 4, 0.0, 0.0, 2),
                                           (4, 6, 0.1, 1e-3, None), (6, 6, 1.0, 1.0, 3)])
def test_matches_numpy_reference(d1, d2, r1, r2, k):
    x, y = correlated_views(d1=d1, d2=d2)
    sv = numpy_canonical_correlations(x, y, r1, r2)
    expected = sv[: (k or min(d1, d2))].sum()
    got = cca_correlation(torch.tensor(x), torch.tensor(y), r1, r2, k)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_matches_scikit_learn_cca():
    from sklearn.cross_decomposition import CCA

    x, y = correlated_views(d1=4, d2=4)
    cca = CCA(n_components=4, scale=False, max_iter=5000, tol=1e-12).fit(x, y)
    xs, ys = cca.transform(x, y)
    total = sum(np.corrcoef(xs[:, i], ys[:, i])[0, 1] for i in range(4))
    assert cca_correlation(torch.tensor(x), torch.tensor(y)).item() == pytest.approx(total, rel=1e-6)


def test_invariant_to_invertible_affine_maps():
    x, y = (torch.tensor(v) for v in correlated_views())
    base = cca_correlation(x, y)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 4, generator=g, dtype=DT) + 2 * torch.eye(4, dtype=DT)
    c = torch.randn(4, 4, generator=g, dtype=DT) + 2 * torch.eye(4, dtype=DT)
    torch.testing.assert_close(cca_correlation(x @ a + 3.0, y), base)
    torch.testing.assert_close(cca_correlation(x, y @ c - 1.0), base)
    torch.testing.assert_close(cca_correlation(y, x), base)  # symmetric
    # Analytic cases: a view against an invertible map of itself correlates fully in every direction.
    assert cca_correlation(x, x @ a).item() == pytest.approx(4.0, rel=1e-10)
    independent = cca_correlation(torch.randn(4000, 3, dtype=DT, generator=g), torch.randn(4000, 3, dtype=DT, generator=g))
    assert 0 <= independent.item() < 0.15


def test_gradcheck_including_coinciding_eigenvalues():
    x, y = (torch.tensor(v[:8, :3]).requires_grad_(True) for v in correlated_views(d1=3, d2=3))
    assert torch.autograd.gradcheck(lambda a, b: cca_correlation(a, b), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: cca_correlation(a, b, 0.1, 0.5, k=2), (x, y))
    # Whitened features: Σ11 = I, every eigenvalue equal, where an eigh-based gradient divides by zero.
    q, _ = torch.linalg.qr(torch.randn(8, 3, dtype=DT))
    q = q - q.mean(0)
    w = (q @ torch.linalg.inv(torch.linalg.cholesky(q.T @ q / 7)).T).requires_grad_(True)
    torch.testing.assert_close(w.T @ w / 7, torch.eye(3, dtype=DT))
    loss = cca_correlation(w, y)
    loss.backward()
    assert torch.isfinite(w.grad).all()
    assert torch.autograd.gradcheck(lambda a: cca_correlation(a, y.detach()), (w.detach().requires_grad_(True),))


def test_float32_and_bfloat16_inputs():
    x, y = (torch.tensor(v) for v in correlated_views())
    ref = cca_correlation(x, y).item()
    out = cca_correlation(x.float(), y.float())
    assert out.dtype == torch.float32 and out.item() == pytest.approx(ref, rel=1e-5)
    assert cca_correlation(x.bfloat16(), y.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("call,match", [
    (lambda: cca_correlation(torch.randn(4, 4), torch.randn(4, 4)), "batch larger than 4 or pass r1 > 0"),
    (lambda: cca_correlation(torch.randn(8, 3), torch.randn(8, 9)), "batch larger than 9 or pass r2 > 0"),
    (lambda: cca_correlation(torch.randn(8, 3), torch.randn(8, 3), r1=-0.1), "≥ 0"),
    (lambda: cca_correlation(torch.randn(8, 3), torch.randn(7, 3)), "same B"),
    (lambda: cca_correlation(torch.randn(8, 3), torch.randn(8, 3), k=4), "k must be in"),
    (lambda: cca_correlation(torch.randn(8, 3) * torch.tensor([1.0, 1.0, 0.0]), torch.randn(8, 3)), "singular"),
    (lambda: dccae_loss(*[torch.randn(8, 2)] * 6, lam=-1.0, r1=0, r2=0), "lam"),
])
def test_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_regularisation_allows_small_batches():
    x, y = torch.randn(4, 6, dtype=DT), torch.randn(4, 6, dtype=DT)
    assert torch.isfinite(cca_correlation(x, y, 1e-3, 1e-3))


def test_dccae_loss_terms_and_weighting():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.rand(16, 1, 4, 4, generator=g, dtype=DT), torch.rand(16, 10, generator=g, dtype=DT)
    p1, p2 = torch.rand(16, 1, 4, 4, generator=g, dtype=DT), torch.rand(16, 10, generator=g, dtype=DT)
    h1, h2 = torch.randn(16, 3, generator=g, dtype=DT), torch.randn(16, 3, generator=g, dtype=DT)
    loss, parts = dccae_loss(h1, h2, x1, p1, x2, p2, lam=0.01, r1=1e-4, r2=1e-4)
    # Reconstruction: squared error summed over every pixel of a sample, averaged over the N samples.
    err = sum(((a[i] - b[i]) ** 2).sum() for a, b in ((x1, p1), (x2, p2)) for i in range(16)) / 16
    torch.testing.assert_close(parts["reconstruction"], err)
    torch.testing.assert_close(reconstruction_error(x1, p1), ((x1 - p1) ** 2).sum() / 16)
    corr = cca_correlation(h1, h2, 1e-4, 1e-4)
    torch.testing.assert_close(parts["correlation"], corr)
    torch.testing.assert_close(loss, -corr + 0.01 * err)
    q1 = p1[:8, :, :2, :2].clone().requires_grad_(True)
    g1 = h1[:8].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: dccae_loss(a, h2[:8], x1[:8, :, :2, :2], b, x2[:8], p2[:8], lam=0.5, r1=0.1, r2=0.1)[0], (g1, q1))
