"""KoLeo (arXiv:1806.03198; DINOv2 arXiv:2304.07193 §4): a naive nearest-neighbour double loop, float64
gradcheck, invariance to rescaling, duplicate rows, errors."""
from __future__ import annotations

import math

import pytest
import torch

from selfsup.losses.distillation import koleo_loss

DT = torch.float64


def naive_koleo(x, eps=1e-8):
    """−(1/B) Σ_i log(min_{j≠i} ‖x̂_i − x̂_j‖ + eps), the nearest neighbour found by a double loop."""
    xn = [row / max(float(row.norm()), eps) for row in x]
    total = 0.0
    for i, a in enumerate(xn):
        nearest = min(float((a - b).norm()) for j, b in enumerate(xn) if j != i)
        total -= math.log(nearest + eps)
    return total / len(xn)


@pytest.mark.parametrize("b,d", [(2, 3), (7, 4), (16, 8)])
def test_koleo_matches_double_loop(b, d):
    x = torch.randn(b, d, dtype=DT)
    assert koleo_loss(x).item() == pytest.approx(naive_koleo(x), rel=1e-10)


def test_koleo_scale_invariant_and_analytic():
    x = torch.randn(9, 5, dtype=DT)
    scales = torch.rand(9, 1, dtype=DT) * 10 + 0.1  # a positive factor per row
    torch.testing.assert_close(koleo_loss(x * scales), koleo_loss(x))
    # Two antipodal points: each other's neighbour at distance 2.
    two = torch.tensor([[1.0, 0.0], [-3.0, 0.0]], dtype=DT)
    assert koleo_loss(two).item() == pytest.approx(-math.log(2 + 1e-8), rel=1e-12)


def test_koleo_gradcheck_and_spreading():
    x = torch.randn(6, 4, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: koleo_loss(v), (x,))
    # A gradient step spreads the points: the loss goes down.
    x = torch.randn(32, 3, dtype=DT, requires_grad=True)
    before = koleo_loss(x)
    before.backward()
    with torch.no_grad():
        after = koleo_loss(x - 1e-3 * x.grad)
    assert after < before


def test_koleo_duplicates_stay_finite():
    x = torch.randn(5, 4, dtype=DT)
    x[3] = x[1]
    x[4] = 2 * x[1]  # same direction: identical once normalised
    x.requires_grad_(True)
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert loss.item() > -math.log(2.0)  # the duplicates' log(0 + eps) terms dominate: large, finite
    assert koleo_loss(x.detach().float()).dtype == torch.float32
    assert koleo_loss(x.detach().bfloat16()).dtype == torch.float32
    assert torch.isfinite(koleo_loss(torch.zeros(3, 4)))  # zero rows: normalised to 0, still finite


@pytest.mark.parametrize("x,match", [(torch.randn(1, 3), "B ≥ 2"), (torch.randn(4), "B ≥ 2")])
def test_koleo_bad_inputs(x, match):
    with pytest.raises(ValueError, match=match):
        koleo_loss(x)
