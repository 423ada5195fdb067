"""iBOT's masked patch loss (arXiv:2111.07832) and the teacher-side helpers it shares with DINO/DINOv2:
a naive per-token loop, masked-positions-only reading, float64 gradcheck, the zero mask, centring and its
EMA, and DINOv2's Sinkhorn-Knopp targets over the masked tokens."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.losses.distillation import centered_softmax, dino_loss, update_center
from selfsup.losses.ibot import ibot_patch_loss, patch_sinkhorn_targets

DT = torch.float64


def naive_ibot(student, teacher, mask, tau):
    """The MIM loss of arXiv:2111.07832 §3.2 token by token: per image the mean CE over its masked tokens, then the mean
    over all images (an image without masked tokens adds 0)."""
    b, l, _ = student.shape
    total = student.new_zeros(())
    for i in range(b):
        image, count = student.new_zeros(()), 0
        for j in range(l):
            if mask[i, j]:
                log_p = torch.log(torch.exp(student[i, j] / tau) / torch.exp(student[i, j] / tau).sum())
                image = image - (teacher[i, j] * log_p).sum()
                count += 1
        total = total + image / max(count, 1)
    return total / b


def _inputs(b=4, l=6, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, l, k, generator=g, dtype=DT)
    t = torch.softmax(torch.randn(b, l, k, generator=g, dtype=DT) / 0.3, dim=-1)
    m = torch.rand(b, l, generator=g) < 0.5
    m[0] = False  # one image without masked tokens
    m[1, :] = True  # one fully masked
    return s, t, m


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_patch_loss_matches_token_loop(tau):
    s, t, m = _inputs()
    torch.testing.assert_close(ibot_patch_loss(s, t, m, tau), naive_ibot(s, t, m, tau))


def test_patch_loss_reads_masked_positions_only():
    s, t, m = _inputs()
    t2, s2 = t.clone(), s.clone()
    t2[~m] = torch.nan  # anything at unmasked teacher positions: not even NaN leaks in
    s2[~m] = 1e4 * torch.randn_like(s2[~m])
    torch.testing.assert_close(ibot_patch_loss(s2, t2, m), ibot_patch_loss(s, t, m))
    s.requires_grad_(True)
    ibot_patch_loss(s, t2, m).backward()
    assert torch.isfinite(s.grad).all() and (s.grad[~m] == 0).all()


def test_patch_loss_analytic_and_views():
    # Uniform student logits: each masked token's CE is log K whatever the targets.
    _, t, m = _inputs()
    masked_images = int((m.sum(1) > 0).sum())
    loss = ibot_patch_loss(torch.zeros_like(t), t, m)
    assert loss.item() == pytest.approx(math.log(5) * masked_images / 4, rel=1e-12)
    # Two global views stacked along the batch = the mean of the per-view losses (iBOT's n_loss_terms2).
    s, t, m = _inputs(b=6)
    per_view = [ibot_patch_loss(s[i:i + 3], t[i:i + 3], m[i:i + 3]) for i in (0, 3)]
    torch.testing.assert_close(ibot_patch_loss(s, t, m), sum(per_view) / 2)


def test_patch_loss_gradcheck_and_zero_mask():
    s, t, m = _inputs(b=2, l=3, k=4)
    m[0, 1] = True
    s.requires_grad_(True)
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ibot_patch_loss(a, b, m, 0.2), (s, t))
    none = torch.zeros_like(m)
    loss = ibot_patch_loss(s, t, none)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(s.grad).all() and (s.grad == 0).all()


def test_patch_loss_bad_inputs():
    s, t, m = _inputs()
    with pytest.raises(ValueError, match="bool"):
        ibot_patch_loss(s, t, m.float())
    with pytest.raises(ValueError, match="one shape"):
        ibot_patch_loss(s, t[:, :-1], m)
    with pytest.raises(ValueError, match="student_temp"):
        ibot_patch_loss(s, t, m, 0.0)


def test_centered_softmax_and_dino_loss_share_it():
    t = torch.randn(3, 4, 7, dtype=DT)
    c = torch.randn(1, 1, 7, dtype=DT)
    p = centered_softmax(t, c, 0.04)
    torch.testing.assert_close(p, torch.exp((t - c) / 0.04) / torch.exp((t - c) / 0.04).sum(-1, keepdim=True))
    assert centered_softmax(t.bfloat16(), c, 0.1).dtype == torch.float32  # sharpened targets need fp32
    # DINO's CLS loss is H(centered_softmax(t), softmax(s)).
    s, tc = torch.randn(2, 5, 7, dtype=DT), torch.randn(2, 5, 7, dtype=DT)
    c2 = torch.randn(7, dtype=DT)
    ref = sum(-(centered_softmax(tc[g], c2, 0.04) * F.log_softmax(s[1 - g] / 0.1, -1)).sum(-1).mean() for g in (0, 1))
    torch.testing.assert_close(dino_loss(s, tc, c2), ref / 2)
    with pytest.raises(ValueError, match="temperature"):
        centered_softmax(t, c, 0.0)


def test_update_center_means_and_momentum():
    t = torch.randn(4, 6, 5, dtype=DT)
    c = torch.randn(1, 1, 5, dtype=DT)
    # iBOT: mean over every token (mean over L, then over B).
    torch.testing.assert_close(update_center(c, t, 0.9), 0.9 * c + 0.1 * t.mean(1).mean(0).view(1, 1, 5))
    # DINOv2: mean over the masked tokens only.
    m = torch.rand(4, 6) < 0.4
    m[0, 0] = True
    torch.testing.assert_close(update_center(c, t, 0.9, mask=m), 0.9 * c + 0.1 * t[m].mean(0).view(1, 1, 5))
    # DINO's CLS centre, (1, K) shape kept; momentum 1 freezes it, 0 replaces it.
    cls, c1 = torch.randn(8, 5, dtype=DT), torch.randn(1, 5, dtype=DT)
    torch.testing.assert_close(update_center(c1, cls, 1.0), c1)
    torch.testing.assert_close(update_center(c1, cls, 0.0), cls.mean(0, keepdim=True))
    # No masked token anywhere: the centre stays; gather on one process changes nothing.
    torch.testing.assert_close(update_center(c, t, 0.9, mask=torch.zeros(4, 6, dtype=torch.bool)), c)
    torch.testing.assert_close(update_center(c, t, 0.9, mask=m, gather=True), update_center(c, t, 0.9, mask=m))
    with pytest.raises(ValueError, match="momentum"):
        update_center(c, t, 1.5)
    with pytest.raises(ValueError, match="mask"):
        update_center(c1, cls, 0.9, mask=m)
    with pytest.raises(ValueError, match="K = 5"):
        update_center(torch.zeros(1, 4), cls)


def test_patch_sinkhorn_targets_over_masked_tokens():
    t = torch.randn(3, 8, 4, dtype=DT)
    m = torch.rand(3, 8) < 0.6
    m[0, :3] = True
    q = patch_sinkhorn_targets(t, m, temperature=0.5, iterations=3)
    assert q.shape == t.shape and (q[~m] == 0).all()
    torch.testing.assert_close(q[m].sum(-1), torch.ones(int(m.sum()), dtype=DT))  # each masked token: a distribution
    # Unmasked teacher tokens play no part in the transport problem.
    t2 = t.clone()
    t2[~m] = 100.0
    torch.testing.assert_close(patch_sinkhorn_targets(t2, m, 0.5), q)
    # Nothing masked: all zeros, no error.
    assert (patch_sinkhorn_targets(t, torch.zeros_like(m), 0.5) == 0).all()
