"""Distillation from a fixed, pretrained teacher: the student's embedding of a view matched to the teacher's
embedding of the same view (function matching, Beyer et al. 2022, arXiv:2106.05237: teacher and student see
exactly the same crops).

- :func:`queue_distillation_loss`: SEED's loss (Fang et al. 2021, arXiv:2101.04731, and its reference code,
  jacobswan1/SEED ``seed/builder.py``): the teacher's similarities to a queue of past teacher embeddings, its own
  embedding included, give soft pseudo-labels the student's similarities to the same set must match (cross-entropy).
  LightlyTrain's distillation v1 is the same construction ("the teacher batch representations are projected on the
  queue to obtain soft pseudo labels", one temperature for both, KL instead of cross-entropy: the same gradient).
- :func:`normalized_mse`: the squared distance between the l2-normalised student and teacher features of the same
  image, LightlyTrain's distillation v2 ("a mean squared error loss between the features of the student and teacher
  networks when processing the same image"), on unit vectors here: LightlyTrain regresses a DINOv2 ViT's tokens,
  whose scale LayerNorm fixes, whereas a selfsup teacher may be any CNN with ReLU features of any scale.

Both are one direction on their inputs: the teacher's embeddings arrive already computed without gradient (the
method's ``torch.no_grad()``), nothing is detached here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses.precision import fp32_loss


def _check_pair(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ValueError(f"{what}: student and teacher embeddings must both be (B, D) of one shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)} (project the student to the teacher's width)")


@fp32_loss
def queue_distillation_loss(student: Tensor, teacher: Tensor, queue: Tensor, student_temp: float = 0.2,
                            teacher_temp: float = 1e-4) -> Tensor:
    """SEED's cross-entropy between the teacher's and the student's similarity distributions over ``[t_i; queue]``.

    student: (B, D) student embeddings (projected to the teacher's width), teacher: (B, D) teacher embeddings of the
    same views, queue: (K, D) past teacher embeddings, l2-normalised (K may be 0). With ŝ, t̂ the l2-normalised rows
    and D⁺_i = [t̂_i, q_1, …, q_K] (the teacher's own embedding first, as SEED adds it to the queue):

        p^T_ij = softmax_j(t̂_i·D⁺_ij / τ_T),  p^S_ij = softmax_j(ŝ_i·D⁺_ij / τ_S),
        loss = (1/B) Σ_i −Σ_j p^T_ij log p^S_ij.

    Defaults are the SEED code's (``--temp 0.2`` for the student, ``--distill-t 1e-4`` for the teacher, so the
    targets are nearly one-hot on t̂_i itself and the loss acts as InfoNCE towards the teacher's embedding with the
    queue as negatives, softened where the queue holds near-duplicates). At ŝ = t̂ and τ_S = τ_T the loss is the
    entropy of p^T, its minimum.
    """
    _check_pair(student, teacher, "queue_distillation_loss")
    if queue.ndim != 2 or queue.shape[1] != teacher.shape[1]:
        raise ValueError(f"queue_distillation_loss: the queue must be (K, {teacher.shape[1]}), got {tuple(queue.shape)}")
    if student_temp <= 0 or teacher_temp <= 0:
        raise ValueError(f"queue_distillation_loss: temperatures must be > 0, got student {student_temp}, "
                         f"teacher {teacher_temp}")
    s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    q = queue.to(s.dtype)
    own_s = (s * t).sum(dim=1, keepdim=True)  # (B, 1): ŝ_i·t̂_i
    own_t = (t * t).sum(dim=1, keepdim=True)  # (B, 1): t̂_i·t̂_i = 1, kept as SEED computes it
    logits_s = torch.cat([own_s, s @ q.T], dim=1) / student_temp  # (B, 1 + K)
    logits_t = torch.cat([own_t, t @ q.T], dim=1) / teacher_temp
    targets = F.softmax(logits_t, dim=1)
    return -(targets * F.log_softmax(logits_s, dim=1)).sum(dim=1).mean()


@fp32_loss
def normalized_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over the batch of ``‖ŝ_i − t̂_i‖²`` on l2-normalised rows; student, teacher: (B, D).

    In [0, 4], 0 exactly when every student embedding points the way of its teacher's; equal to ``2 − 2·cos``
    (the form BYOL writes, arXiv:2006.07733 eq. 2), and invariant to a positive rescaling of either row.
    """
    _check_pair(student, teacher, "normalized_mse")
    s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    return (s - t).pow(2).sum(dim=1).mean()
