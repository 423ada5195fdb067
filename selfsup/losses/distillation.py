"""Self-distillation losses: a student's output regressed or matched onto a teacher's.

- :func:`byol_loss`: BYOL's normalised MSE, ``‖p̄ − z̄‖² = 2 − 2·cos(p, z)`` (Grill et al. 2020,
  arXiv:2006.07733, eq. 2).
- :func:`negative_cosine`: SimSiam's ``D(p, z) = −cos(p, z)`` (Chen & He 2020, arXiv:2011.10566, eq. 1).
- :func:`dino_loss`: DINO's cross-entropy between the sharpened, centred teacher distribution and the
  student's, over every (teacher global view, other student view) pair (Caron et al. 2021,
  arXiv:2104.14294, eq. 3 and Algorithm 1).

Each is one direction on its inputs; the method symmetrises and decides where gradients stop (the
target branch of BYOL, SimSiam and DINO is detached by the method, not here, so the SimSiam
no-stop-gradient ablation uses the same loss).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses.precision import fp32_loss


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """Mean over the batch of ``2 − 2·cos(p_i, z_i)``; p: (B, D) predictions, z: (B, D) targets.

    In [0, 4]; 0 when every prediction points the way of its target. BYOL's total loss is the sum of
    this term for both view orders (arXiv:2006.07733, §3.1).
    """
    return (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """Mean over the batch of ``−cos(p_i, z_i)``; p, z: (B, D). In [−1, 1]; −1 is the minimum."""
    return -F.cosine_similarity(p, z, dim=1).mean()


def _views(x: Tensor | Sequence[Tensor], n: int | None, what: str) -> list[Tensor]:
    if isinstance(x, Tensor):
        if x.ndim == 3:
            return list(x.unbind(0))
        if x.ndim != 2 or n is None or x.shape[0] % n:
            raise ValueError(f"dino_loss: {what} must be a list of (B, K) tensors, a (V, B, K) tensor or a "
                             f"(V·B, K) tensor whose rows split into views; got shape {tuple(x.shape)}")
        return list(x.chunk(n))
    return list(x)


@fp32_loss
def dino_loss(student_out: Tensor | Sequence[Tensor], teacher_out: Tensor | Sequence[Tensor], center: Tensor,
              student_temp: float = 0.1, teacher_temp: float = 0.04, n_global: int = 2) -> Tensor:
    """DINO's multi-crop cross-entropy ``H(P_t, P_s)``, averaged over the pairs it compares.

    student_out: the student head's logits of every view, global views first: a list of V (B, K)
        tensors, a (V, B, K) tensor, or a (V·B, K) tensor (views stacked, ``n_global`` of them are global).
    teacher_out: the teacher's logits of the G global views: list of G (B, K), (G, B, K) or (G·B, K).
    center: (K,) or (1, K), subtracted from the teacher logits before sharpening.

    ``P_t = softmax((t − c)/τ_t)``, ``log P_s = log_softmax(s/τ_s)``; teacher view g is compared with
    every student view v ≠ g (the same global view is skipped), each pair is ``−Σ_k P_t log P_s``
    averaged over the batch, and the loss is the mean over the G·V − G pairs (arXiv:2104.14294, Alg. 1).
    """
    if student_temp <= 0 or teacher_temp <= 0:
        raise ValueError(f"dino_loss: temperatures must be > 0, got student {student_temp}, teacher {teacher_temp}")
    teachers = _views(teacher_out, n_global, "teacher_out")
    g = len(teachers)
    students = _views(student_out, None if not isinstance(student_out, Tensor) or student_out.ndim != 2
                      else student_out.shape[0] // teachers[0].shape[0], "student_out")
    if len(students) < g:
        raise ValueError(f"dino_loss: the student sees {len(students)} views, fewer than the teacher's {g}")
    if len(students) == 1 and g == 1:
        raise ValueError("dino_loss: one view only, so there is no pair of different views to compare")
    log_p_s = [F.log_softmax(s / student_temp, dim=-1) for s in students]
    terms = []
    for gi, t in enumerate(teachers):
        p_t = F.softmax((t - center.reshape(1, -1)) / teacher_temp, dim=-1)
        terms += [-(p_t * ls).sum(dim=-1).mean() for vi, ls in enumerate(log_p_s) if vi != gi]
    return torch.stack(terms).mean()
