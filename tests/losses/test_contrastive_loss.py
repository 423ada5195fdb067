"""NT-Xent / InfoNCE against a naive loop written from the SimCLR paper, analytic cases and gradcheck."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.losses.contrastive import info_nce, nt_xent


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Algorithm 1 of arXiv:2002.05709, literally: 2N views, ℓ(i, j) = −log softmax over k ≠ i."""
    z = torch.cat([torch.stack([a, b]) for a, b in zip(z1, z2)])  # views 2k and 2k+1 are a pair
    n2 = z.shape[0]
    sim = lambda u, v: torch.dot(u, v) / (u.norm() * v.norm())
    total = z.new_zeros(())
    for i in range(n2):
        j = i + 1 if i % 2 == 0 else i - 1
        denom = sum(torch.exp(sim(z[i], z[k]) / tau) for k in range(n2) if k != i)
        total = total - torch.log(torch.exp(sim(z[i], z[j]) / tau) / denom)
    return total / n2


@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.5), (5, 8, 0.1), (8, 4, 1.0), (3, 16, 0.07)])
def test_nt_xent_matches_naive(n, d, tau):
    z1, z2 = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    torch.testing.assert_close(nt_xent(z1, z2, tau), naive_nt_xent(z1, z2, tau))


def test_nt_xent_perfectly_aligned_analytic():
    """Pairs identical and orthogonal to every other view: ℓ = −log(e^{1/τ} / (e^{1/τ} + 2N − 2))."""
    n, tau = 4, 0.5
    z = torch.eye(n, dtype=torch.float64)
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * n - 2))
    assert nt_xent(z, z.clone(), tau).item() == pytest.approx(expected, rel=1e-12)


def test_nt_xent_scale_invariant_and_symmetric():
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    base = nt_xent(z1, z2, 0.3)
    torch.testing.assert_close(nt_xent(3.0 * z1, 0.5 * z2, 0.3), base)
    torch.testing.assert_close(nt_xent(z2, z1, 0.3), base)


def test_info_nce_with_queue_matches_formula():
    """MoCo v2 form: logits [q·k⁺, q·queue] / τ, label 0 (arXiv:1911.05722, Algorithm 1)."""
    q, k, queue = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    qn, kn, nn_ = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1)
    expected = torch.stack([
        -torch.log_softmax(torch.cat([(qn[i] * kn[i]).sum()[None], qn[i] @ nn_.T]) / 0.2, 0)[0] for i in range(4)
    ]).mean()
    torch.testing.assert_close(info_nce(q, k, 0.2, negatives=queue, in_batch=False), expected)


def test_info_nce_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        info_nce(torch.randn(2, 3), torch.randn(2, 3), 0.0)


def test_nt_xent_gradcheck():
    z1 = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.5), (z1, z2))
    q = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    neg = torch.randn(5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: info_nce(a, b, 0.2, negatives=neg), (q, k))


def test_losses_run_in_fp32_under_bf16_autocast():
    """Under bf16 autocast the InfoNCE logits would be bf16; the loss must equal its fp32 value."""
    from selfsup.losses import dcl_loss, info_nce

    torch.manual_seed(0)
    q, k = torch.randn(64, 32), torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = info_nce(q, k, 0.1, query_negatives=True)
        dcl_under = dcl_loss(q, k, 0.1)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, info_nce(q, k, 0.1, query_negatives=True))
    torch.testing.assert_close(dcl_under, dcl_loss(q, k, 0.1))
    # bf16 inputs (a bf16 projection head's output) are cast up, and the gradient flows back
    qb = q.to(torch.bfloat16).requires_grad_()
    info_nce(qb, k.to(torch.bfloat16), 0.1).backward()
    assert qb.grad is not None and qb.grad.dtype == torch.bfloat16


def test_fp32_loss_casts_lists_of_views():
    """DINO gets its views as lists/tuples of bf16 tensors: they are cast too, so the loss is the fp32 one."""
    from selfsup.losses import dino_loss

    torch.manual_seed(0)
    student = [torch.randn(8, 16) for _ in range(4)]
    teacher = torch.randn(16, 16)
    center = torch.randn(16)
    reference = dino_loss(student, teacher.chunk(2), center)
    low = dino_loss([s.to(torch.bfloat16) for s in student], teacher.to(torch.bfloat16).chunk(2), center)
    assert low.dtype == torch.float32
    expected = dino_loss([s.to(torch.bfloat16).float() for s in student], teacher.to(torch.bfloat16).float().chunk(2),
                         center)
    torch.testing.assert_close(low, expected)
    assert abs(low.item() - reference.item()) < 0.05
