"""Barlow Twins, VICReg and W-MSE losses against naive loops written from their papers, analytic and
invariance cases, gradcheck, and the errors a user gets for impossible settings."""
from __future__ import annotations

import pytest
import torch

from selfsup.losses.redundancy import (_off_diagonal, barlow_twins_loss, covariance_loss, cross_correlation,
                                       invariance_loss, variance_loss, vicreg_loss, whiten, wmse_loss)
from selfsup.methods import METHODS
from selfsup.nn.backbones import build_backbone
from selfsup.views import ViewRecipe

f64 = dict(dtype=torch.float64)


def hadamard_columns(n: int) -> torch.Tensor:
    """(n, n − 1) columns of a Sylvester Hadamard matrix without the constant one: zero mean, unit
    population variance, mutually orthogonal — perfectly decorrelated embeddings."""
    h = torch.ones(1, 1, **f64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h[:, 1:]


@pytest.mark.parametrize("d", [1, 2, 3, 8])
def test_off_diagonal_is_every_entry_off_the_diagonal_in_row_major_order_and_passes_gradients(d):
    m = torch.randn(d, d, **f64, requires_grad=True)
    expected = [m[i, j] for i in range(d) for j in range(d) if i != j]
    got = _off_diagonal(m)
    assert got.shape == (d * (d - 1),) and all(torch.equal(a, b) for a, b in zip(got, expected))
    got.pow(2).sum().backward()
    torch.testing.assert_close(m.grad, 2 * m.detach() * (1 - torch.eye(d, **f64)))


# --- Barlow Twins -------------------------------------------------------------------------------

def naive_barlow_twins(za: torch.Tensor, zb: torch.Tensor, lambd: float) -> torch.Tensor:
    """arXiv:2103.03230 eqs. 1–2, literally: C_ij = Σ_b z^A_bi z^B_bj / (√Σ_b (z^A_bi)² √Σ_b (z^B_bj)²)
    of the batch-centred embeddings; L = Σ_i (1 − C_ii)² + λ Σ_i Σ_{j≠i} C_ij²."""
    n, d = za.shape
    a = [[za[b, i] - sum(za[k, i] for k in range(n)) / n for i in range(d)] for b in range(n)]
    c = [[zb[b, j] - sum(zb[k, j] for k in range(n)) / n for j in range(d)] for b in range(n)]
    loss = za.new_zeros(())
    for i in range(d):
        for j in range(d):
            num = sum(a[b][i] * c[b][j] for b in range(n))
            den = torch.sqrt(sum(a[b][i] ** 2 for b in range(n))) * torch.sqrt(sum(c[b][j] ** 2 for b in range(n)))
            cij = num / den
            loss = loss + ((1 - cij) ** 2 if i == j else lambd * cij ** 2)
    return loss


@pytest.mark.parametrize("n,d,lambd", [(4, 3, 5e-3), (7, 5, 0.1), (16, 4, 0.0), (5, 8, 1.0)])
def test_barlow_twins_matches_naive(n, d, lambd):
    za, zb = torch.randn(n, d, **f64), torch.randn(n, d, **f64)
    torch.testing.assert_close(barlow_twins_loss(za, zb, lambd, eps=0.0), naive_barlow_twins(za, zb, lambd))
    # The default ε (BatchNorm's 1e-5) only nudges unit-variance data.
    torch.testing.assert_close(barlow_twins_loss(za, zb, lambd), naive_barlow_twins(za, zb, lambd),
                               rtol=1e-3, atol=1e-4)


def test_barlow_twins_per_dimension_affine_invariance():
    za, zb = torch.randn(32, 6, **f64), torch.randn(32, 6, **f64)
    scale_a, scale_b = torch.rand(6, **f64) * 5 + 0.1, torch.rand(6, **f64) * 5 + 0.1
    shift_a, shift_b = torch.randn(6, **f64) * 10, torch.randn(6, **f64) * 10
    base = barlow_twins_loss(za, zb, eps=0.0)
    torch.testing.assert_close(barlow_twins_loss(za * scale_a + shift_a, zb * scale_b + shift_b, eps=0.0), base)
    torch.testing.assert_close(barlow_twins_loss(za * scale_a + shift_a, zb * scale_b + shift_b), base, rtol=1e-3,
                               atol=0)


def test_barlow_twins_analytic_cases():
    z = hadamard_columns(8)  # decorrelated, identical views: C = I, loss 0
    torch.testing.assert_close(cross_correlation(z, z, eps=0.0), torch.eye(7, **f64))
    assert barlow_twins_loss(z, 3 * z + 1, eps=0.0).item() == pytest.approx(0.0, abs=1e-12)
    # Anti-correlated views: every C_ii = −1, so the on-diagonal term is 4 per dimension.
    assert barlow_twins_loss(z, -z, lambd=0.7, eps=0.0).item() == pytest.approx(4 * 7, rel=1e-12)
    # Every dimension a copy of one: C is all ones, loss λ·D(D−1).
    col = torch.randn(10, 1, **f64)
    assert barlow_twins_loss(col.repeat(1, 4), col.repeat(1, 4), 0.5, eps=0.0).item() == pytest.approx(0.5 * 12)


def test_barlow_twins_gradcheck():
    za = torch.randn(6, 4, **f64, requires_grad=True)
    zb = torch.randn(6, 4, **f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: barlow_twins_loss(a, b, 0.1), (za, zb))


def test_barlow_twins_bad_inputs():
    with pytest.raises(ValueError, match="λ.*≥ 0"):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 3), lambd=-1e-3)
    with pytest.raises(ValueError, match="at least 2 samples"):
        barlow_twins_loss(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="same shape"):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 2))


# --- VICReg ---------------------------------------------------------------------------------------

def naive_vicreg(za: torch.Tensor, zb: torch.Tensor, lam: float, mu: float, nu: float, gamma: float = 1.0,
                 eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """arXiv:2105.04906 eqs. 1–5 with explicit sums, combined as the authors' code combines them
    (facebookresearch/vicreg main_vicreg.py): s is the mean squared difference over the n·d entries
    (Algorithm 1's mse_loss), v and c per branch with unbiased (n − 1) statistics, the two branches'
    variance hinges averaged (``/ 2`` each) and their covariance terms summed."""
    n, d = za.shape
    s = sum((za[b, j] - zb[b, j]) ** 2 for b in range(n) for j in range(d)) / (n * d)

    def v(z):
        total = z.new_zeros(())
        for j in range(d):
            mean = sum(z[b, j] for b in range(n)) / n
            var = sum((z[b, j] - mean) ** 2 for b in range(n)) / (n - 1)
            total = total + torch.clamp(gamma - torch.sqrt(var + eps), min=0)
        return total / d

    def c(z):
        means = [sum(z[b, j] for b in range(n)) / n for j in range(d)]
        total = z.new_zeros(())
        for i in range(d):
            for j in range(d):
                if i != j:
                    cov = sum((z[b, i] - means[i]) * (z[b, j] - means[j]) for b in range(n)) / (n - 1)
                    total = total + cov ** 2
        return total / d

    var, cov = v(za) / 2 + v(zb) / 2, c(za) + c(zb)
    return lam * s + mu * var + nu * cov, s, var, cov


@pytest.mark.parametrize("n,d,weights", [(4, 3, (25.0, 25.0, 1.0)), (9, 5, (1.0, 2.0, 3.0)), (6, 2, (0.0, 1.0, 0.0))])
def test_vicreg_matches_naive(n, d, weights):
    za, zb = 0.7 * torch.randn(n, d, **f64), 1.3 * torch.randn(n, d, **f64) + 0.5
    loss, terms = vicreg_loss(za, zb, *weights)
    ref, s, var, cov = naive_vicreg(za, zb, *weights)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(terms["invariance"], s)
    torch.testing.assert_close(terms["variance"], var)
    torch.testing.assert_close(terms["covariance"], cov)


def test_vicreg_terms_vanish_where_the_paper_says():
    z = torch.randn(12, 5, **f64)
    assert invariance_loss(z, z.clone()).item() == 0.0
    # Every per-dimension std ≥ γ: the hinge is off.
    wide = 3 * hadamard_columns(16)  # std of each column ≈ 3.1 (unbiased)
    assert variance_loss(wide, gamma=1.0).item() == 0.0
    assert variance_loss(wide, gamma=4.0).item() > 0.0
    # Decorrelated dimensions, of any scale: no off-diagonal covariance.
    decorrelated = hadamard_columns(8) * torch.tensor([0.1, 1, 2, 3, 4, 5, 6], **f64) + 7
    assert covariance_loss(decorrelated).item() == pytest.approx(0.0, abs=1e-24)
    # A collapsed (constant) embedding pays γ − √ε per dimension.
    assert variance_loss(torch.ones(8, 3, **f64), 1.0, 1e-4).item() == pytest.approx(1 - 1e-2)


def test_vicreg_variance_weight_is_the_mean_over_branches():
    """Two fully collapsed branches pay μ (γ − √ε) in all, not 2 μ (γ − √ε): the reference code
    averages the branches' hinges (main_vicreg.py ``std_loss = ... / 2 + ... / 2``), and its
    25/25/1 weights were tuned with that average. The covariance terms are summed, as there."""
    collapsed = torch.ones(8, 3, **f64)
    loss, terms = vicreg_loss(collapsed, collapsed.clone(), sim_weight=0.0, var_weight=1.0, cov_weight=0.0)
    assert loss.item() == pytest.approx(1 - 1e-2)
    assert terms["variance"].item() == pytest.approx(1 - 1e-2)
    za, zb = torch.randn(10, 4, **f64), 2 * torch.randn(10, 4, **f64)
    _, terms = vicreg_loss(za, zb)
    torch.testing.assert_close(terms["covariance"], covariance_loss(za) + covariance_loss(zb))


def test_vicreg_gradcheck():
    za = 0.5 * torch.randn(6, 4, **f64)
    zb = 0.5 * torch.randn(6, 4, **f64)
    za.requires_grad_(), zb.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: vicreg_loss(a, b)[0], (za, zb))
    for fn in (variance_loss, covariance_loss):
        assert torch.autograd.gradcheck(fn, (za,))


def test_vicreg_bad_inputs():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="var_weight must be ≥ 0"):
        vicreg_loss(z, z, var_weight=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        vicreg_loss(z, z, gamma=0.0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        vicreg_loss(z[:1], z[:1])


# --- W-MSE ----------------------------------------------------------------------------------------

def naive_whiten(x: torch.Tensor, eps: float) -> torch.Tensor:
    """arXiv:2007.06346 by hand: covariance as a sum of outer products, its Cholesky factor
    by the Cholesky–Banachiewicz recursion, W = L⁻¹ by forward substitution per sample."""
    n, d = x.shape
    mean = sum(x[b] for b in range(n)) / n
    cov = sum(torch.outer(x[b] - mean, x[b] - mean) for b in range(n)) / (n - 1) + eps * torch.eye(d, **f64)
    L = [[x.new_zeros(()) for _ in range(d)] for _ in range(d)]
    for i in range(d):
        for j in range(i + 1):
            s = sum(L[i][k] * L[j][k] for k in range(j))
            L[i][j] = torch.sqrt(cov[i, i] - s) if i == j else (cov[i, j] - s) / L[j][j]
    rows = []
    for b in range(n):
        y: list[torch.Tensor] = []
        for i in range(d):
            y.append((x[b, i] - mean[i] - sum(L[i][k] * y[k] for k in range(i))) / L[i][i])
        rows.append(torch.stack(y))
    return torch.stack(rows)


def naive_wmse(za, zb, w_size, w_iter, eps, seed):
    """Algorithm 1: per round a random split into sub-batches, whiten each view in each, then
    ‖a/‖a‖ − b/‖b‖‖² averaged over every sample and round."""
    n = za.shape[0]
    g = torch.Generator().manual_seed(seed)
    total = za.new_zeros(())
    for _ in range(w_iter):
        for idx in torch.randperm(n, generator=g).tensor_split(n // w_size):
            wa, wb = naive_whiten(za[idx], eps), naive_whiten(zb[idx], eps)
            for a, b in zip(wa, wb):
                total = total + ((a / a.norm() - b / b.norm()) ** 2).sum()
    return total / (w_iter * n)


def test_whitened_sub_batch_has_identity_covariance():
    mix = torch.randn(6, 6, **f64)
    x = torch.randn(40, 6, **f64) @ mix + 3.0  # correlated, off-centre
    w = whiten(x)
    torch.testing.assert_close(w.mean(0), torch.zeros(6, **f64))
    torch.testing.assert_close(w.T @ w / (40 - 1), torch.eye(6, **f64))
    torch.testing.assert_close(whiten(x, 1e-3), naive_whiten(x, 1e-3))


@pytest.mark.parametrize("n,d,w_size,w_iter", [(8, 3, 8, 1), (13, 3, 6, 2), (20, 4, 5, 3)])
def test_wmse_matches_naive(n, d, w_size, w_iter):
    za, zb = torch.randn(n, d, **f64), torch.randn(n, d, **f64)
    got = wmse_loss(za, zb, w_size, w_iter, eps=1e-3, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, naive_wmse(za, zb, w_size, w_iter, 1e-3, seed=3))


def test_wmse_analytic_and_invariance():
    z = torch.randn(16, 4, **f64)
    assert wmse_loss(z, z.clone(), w_size=8, eps=0.0).item() == pytest.approx(0.0, abs=1e-12)
    # Whitening removes each view's mean and overall scale (exactly, with ε = 0).
    za, zb = torch.randn(16, 4, **f64), torch.randn(16, 4, **f64)
    base = wmse_loss(za, zb, w_size=16, eps=0.0)
    torch.testing.assert_close(wmse_loss(5 * za - 2, 0.3 * zb + 1, w_size=16, eps=0.0), base)
    # Losses lie in [0, 4]: squared distance of two unit vectors.
    assert 0 <= base.item() <= 4


def test_wmse_gradcheck(one_thread):
    x = torch.randn(7, 3, **f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: whiten(a, 1e-3), (x,))
    za = torch.randn(10, 2, **f64, requires_grad=True)
    zb = torch.randn(10, 2, **f64, requires_grad=True)
    seeded = lambda a, b: wmse_loss(a, b, 4, 2, 1e-3, generator=torch.Generator().manual_seed(0))  # noqa: E731
    assert torch.autograd.gradcheck(seeded, (za, zb))


def test_wmse_bad_inputs():
    z = torch.randn(10, 4)
    with pytest.raises(ValueError, match="batch of 10 is smaller than the whitening sub-batch w_size=16"):
        wmse_loss(z, z, w_size=16)
    with pytest.raises(ValueError, match="larger than the embedding dimension 4"):
        wmse_loss(z, z, w_size=4)
    with pytest.raises(ValueError, match="more samples than dimensions"):
        whiten(torch.randn(4, 4))
    # A degenerate covariance gives NaN (a skipped step), not an exception mid-run.
    assert torch.isnan(whiten(torch.ones(8, 2), eps=0.0)).all()


# --- the methods' own checks ----------------------------------------------------------------------

def _method(name: str, **params):
    backbone = build_backbone("small_resnet", 1, 16, widths=[8, 16])
    return METHODS[name].cls(backbone, **params)


@pytest.mark.parametrize("name,params,match", [
    ("barlowtwins", {"lambd": -0.1}, "λ"),
    ("vicreg", {"cov_weight": -1.0}, "cov_weight"),
    ("vicreg", {"gamma": 0.0}, "gamma"),
    ("wmse", {"w_size": 64, "proj_dim": 64}, "larger than the embedding dimension"),
    ("wmse", {"w_iter": 0}, "w_iter"),
])
def test_methods_reject_impossible_params(name, params, match):
    with pytest.raises(ValueError, match=match):
        _method(name, **params)


def test_method_check_run_problems():
    two_views = ViewRecipe()
    wmse = _method("wmse", w_size=128, proj_dim=64)
    assert wmse.check_run(1000, 256, two_views) == []
    problems = wmse.check_run(1000, 64, two_views)
    assert len(problems) == 1 and "batch of 64 is smaller than the whitening sub-batch w_size=128" in problems[0]
