"""Self-distillation losses: a student's output regressed or matched onto a teacher's.

- :func:`byol_loss`: BYOL's normalised MSE, ``‖p̄ − z̄‖² = 2 − 2·cos(p, z)`` (Grill et al. 2020,
  arXiv:2006.07733, eq. 2).
- :func:`negative_cosine`: SimSiam's ``D(p, z) = −cos(p, z)`` (Chen & He 2020, arXiv:2011.10566, eq. 1).
- :func:`dino_loss`: DINO's cross-entropy between the sharpened, centred teacher distribution and the
  student's, over every (teacher global view, other student view) pair (Caron et al. 2021,
  arXiv:2104.14294, eq. 3 and Algorithm 1).
- :func:`multicrop_cross_entropy`: the same pairs with the teacher's targets given (DINOv2's Sinkhorn-Knopp).
- :func:`centered_softmax` and :func:`update_center`: the teacher's centring and sharpening and the EMA of
  its centre, shared by DINO's CLS outputs and iBOT's patch outputs (:mod:`selfsup.losses.ibot`).
- :func:`koleo_loss`: the KoLeo entropy regulariser DINOv2 adds on the student's CLS features (Oquab et
  al. 2023, arXiv:2304.07193 §4; Sablayrolles et al. 2019, arXiv:1806.03198).

Each is one direction on its inputs; the method symmetrises and decides where gradients stop (the
target branch of BYOL, SimSiam and DINO is detached by the method, not here, so the SimSiam
no-stop-gradient ablation uses the same loss).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.distributed import all_reduce_mean, gather as gather_ranks, rank
from selfsup.losses.precision import at_least_f32, fp32_loss


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
    targets = [centered_softmax(t, center.reshape(1, -1), teacher_temp) for t in teachers]
    return multicrop_cross_entropy(students, targets, student_temp)


@fp32_loss
def multicrop_cross_entropy(student_out: Sequence[Tensor], teacher_probs: Sequence[Tensor],
                            student_temp: float = 0.1) -> Tensor:
    """``H(P_t, P_s)`` averaged over every (teacher view g, student view v ≠ g) pair: :func:`dino_loss` with the
    teacher's targets already made (DINOv2's Sinkhorn-Knopp targets, :func:`selfsup.losses.clustering.sinkhorn_knopp`).

    student_out: V (B, K) student logits, global views first; teacher_probs: G ≤ V (B, K) target distributions
    (rows summing to 1) of the global views, in the same order. Each pair is ``−Σ_k P_t log softmax(s/τ_s)``
    averaged over the batch; the result is the mean over the G·V − G pairs (DINO's Algorithm 1, iBOT's
    ``iBOTLoss`` and DINOv2's ``DINOLoss`` summed over pairs and divided by their number).
    """
    if student_temp <= 0:
        raise ValueError(f"multicrop_cross_entropy: student_temp must be > 0, got {student_temp}")
    g = len(teacher_probs)
    if len(student_out) < g or (len(student_out) == 1 and g == 1):
        raise ValueError(f"multicrop_cross_entropy: need at least as many student views as teacher views and a pair "
                         f"of different views; got {len(student_out)} student and {g} teacher view(s)")
    log_p_s = [F.log_softmax(s / student_temp, dim=-1) for s in student_out]
    terms = []
    for gi, p_t in enumerate(teacher_probs):
        p_t = at_least_f32(p_t)
        terms += [-(p_t * ls).sum(dim=-1).mean() for vi, ls in enumerate(log_p_s) if vi != gi]
    return torch.stack(terms).mean()


def centered_softmax(teacher_logits: Tensor, center: Tensor, temperature: float) -> Tensor:
    """The teacher's targets ``softmax((t − c) / τ)`` over the last dimension, in at least float32.

    teacher_logits: (…, K), e.g. (B, K) CLS outputs or (B, L, K) patch outputs; center: broadcastable to
    them ((K,), (1, K) or (1, 1, K)). Centring keeps one prototype from dominating, the low temperature
    keeps the distribution from turning uniform: the two collapses DINO balances (arXiv:2104.14294 §3.1);
    iBOT applies the same to patch tokens with its own centre and temperature (arXiv:2111.07832 §3.2).
    """
    if temperature <= 0:
        raise ValueError(f"centered_softmax: temperature must be > 0, got {temperature}")
    t = at_least_f32(teacher_logits)
    return F.softmax((t - center.to(t.dtype)) / temperature, dim=-1)


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float = 0.9, mask: Tensor | None = None,
                  gather: bool = False) -> Tensor:
    """The next centre ``m·c + (1 − m)·mean(t)``, returned as a new tensor shaped like ``center``.

    teacher_logits: (N, K) CLS outputs, or (B, L, K) patch outputs whose mean runs over every token as in
    iBOT's code (``center2``), or, with ``mask`` (B, L) bool, over the masked tokens only as in DINOv2's
    ``iBOTPatchLoss``. The mean is token-weighted over the whole batch; with ``gather=True`` over every
    process's tokens (sums and counts through ``all_reduce_mean``, processes may hold different counts), so
    each process gets the centre of the combined batch. No token anywhere: the centre is kept.
    Momentum 0.9 in DINO, iBOT and DINOv2 (arXiv:2104.14294 §3.1, the ``center_momentum`` of all three codes).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"update_center: momentum must be in [0, 1], got {momentum}")
    t = at_least_f32(teacher_logits.detach())
    if mask is not None:
        if t.ndim != 3 or mask.shape != t.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"update_center: a mask must be a (B, L) bool tensor for (B, L, K) logits, got mask "
                             f"{tuple(mask.shape)} {mask.dtype} and logits {tuple(t.shape)}")
        t = t[mask]
    t = t.reshape(-1, t.shape[-1])
    if center.numel() != t.shape[1]:
        raise ValueError(f"update_center: the centre has {center.numel()} entries but the logits have K = {t.shape[1]}")
    total = torch.cat([t.sum(dim=0), t.new_tensor([t.shape[0]])])
    if gather:
        total = all_reduce_mean(total)  # sums and count share the 1/world factor, which cancels in the ratio
    if float(total[-1]) == 0:
        return center.clone()
    mean = (total[:-1] / total[-1]).to(center.dtype).reshape(center.shape)
    return center * momentum + mean * (1 - momentum)


@fp32_loss
def koleo_loss(x: Tensor, eps: float = 1e-8, gather: bool = False) -> Tensor:
    """KoLeo: ``−(1/B) Σ_i log(min_{j≠i} ‖x̂_i − x̂_j‖ + eps)`` on the l2-normalised rows x̂ of x (B, D).

    The Kozachenko–Leonenko differential-entropy estimator (Sablayrolles et al. 2019, arXiv:1806.03198):
    it grows when a point's nearest neighbour is close, so minimising it spreads the batch
    uniformly over the sphere. Invariant to a positive rescaling of any row. Exact duplicates are at
    distance 0, giving the finite value −log(eps).

    DINOv2 (arXiv:2304.07193 §4 and its code) applies it per process, without gathering, to the student
    backbone's CLS token of each global crop separately (never between the two crops of one image) and
    adds 0.1 × the sum over the two crops. ``gather=True`` offers the global-batch variant: each row's
    nearest neighbour is searched among the rows of every process (gathered with gradients through
    :func:`selfsup.distributed.gather`) and the loss averages this process's rows, so the mean over
    processes is the single-process loss of the combined batch. Every process must hold the same B.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"koleo_loss: x must be a (B, D) batch with B ≥ 2 (each row needs a neighbour), "
                         f"got shape {tuple(x.shape)}")
    if eps <= 0:
        raise ValueError(f"koleo_loss: eps must be > 0, got {eps}")
    z = F.normalize(x, dim=1, eps=eps)
    others = gather_ranks(z) if gather else z
    b = z.shape[0]
    own = torch.arange(b, device=z.device) + (rank() * b if gather else 0)  # this process's rows within others
    with torch.no_grad():  # the neighbour search is a discrete choice: no gradient through it
        sim = z @ others.T
        sim[torch.arange(b, device=z.device), own] = float("-inf")
        nearest = sim.argmax(dim=1)
    distance = torch.linalg.vector_norm(z - others[nearest], dim=1)
    return -torch.log(distance + eps).mean()
