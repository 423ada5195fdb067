"""iBOT's masked patch self-distillation: the student predicts, at the patches it sees as mask tokens, the
teacher's output distribution for the same patches of the unmasked view.

Zhou et al. iBOT: Image BERT Pre-Training with Online Tokenizer. ICLR 2022, arXiv:2111.07832 (§3.2, the
MIM loss; Algorithm 1). DINOv2 (Oquab et al. 2023, arXiv:2304.07193 §4) keeps this loss and may replace the teacher's
centring by Sinkhorn-Knopp over the masked tokens.

Notation: B images (stack the global views along B: the loss is then the mean over views, as both
reference codes compute it), L patch tokens per image, K prototypes. ``mask`` (B, L) is True where the
student's input held the mask token (:func:`selfsup.nn.masking.blockwise_masks`).

Teacher targets come from the teacher's patch logits by either
- centring and sharpening: :func:`selfsup.losses.distillation.centered_softmax` with the patch centre, which
  the method keeps and moves with :func:`selfsup.losses.distillation.update_center` (iBOT; DINOv2's default), or
- :func:`patch_sinkhorn_targets` (DINOv2's ``centering: sinkhorn_knopp``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.losses.clustering import sinkhorn_knopp
from selfsup.losses.precision import fp32_loss


def _check(student_logits: Tensor, teacher: Tensor, mask: Tensor, name: str) -> None:
    if student_logits.ndim != 3 or teacher.shape != student_logits.shape:
        raise ValueError(f"{name}: expected student logits and teacher targets of one shape (B, L, K), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher.shape)}")
    if mask.shape != student_logits.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"{name}: mask must be a (B, L) = {tuple(student_logits.shape[:2])} bool tensor "
                         f"(True = masked in the student's input), got {tuple(mask.shape)} {mask.dtype}")


@fp32_loss
def ibot_patch_loss(student_logits: Tensor, teacher_probs: Tensor, mask: Tensor, student_temp: float = 0.1) -> Tensor:
    """Masked-patch cross-entropy ``H(P_t, P_s)`` (arXiv:2111.07832 §3.2), averaged per image, then over images.

    student_logits: (B, L, K) head logits of the student's patch tokens (masked input);
    teacher_probs: (B, L, K) teacher targets (rows summing to 1) for the same patches of the unmasked view;
    mask: (B, L) bool. Per image: ``−Σ_k P_t log softmax(s / τ_s)_k`` summed over its masked tokens and
    divided by their number (at least 1); then the mean over all B images, those without a masked token
    counting 0, as in both reference codes (iBOT's ``iBOTLoss``, DINOv2's ``iBOTPatchLoss``). Only masked
    positions are read: the teacher's unmasked positions may hold anything. The method detaches the targets.
    """
    _check(student_logits, teacher_probs, mask, "ibot_patch_loss")
    return ibot_patch_loss_masked(student_logits[mask], teacher_probs[mask], mask, student_temp)


@fp32_loss
def ibot_patch_loss_masked(student_masked: Tensor, teacher_masked: Tensor, mask: Tensor,
                           student_temp: float = 0.1) -> Tensor:
    """:func:`ibot_patch_loss` given only the M masked tokens (DINOv2's ``forward_masked``): no (B, L, K) tensor.

    student_masked: (M, K) student logits and teacher_masked: (M, K) teacher targets at the masked tokens, in
    the order ``x[mask]`` lists them (row-major over mask (B, L) bool); M = mask.sum(). Same value as
    ``ibot_patch_loss(s, t, mask)`` for any s, t with ``s[mask] = student_masked``, ``t[mask] = teacher_masked``.
    """
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError(f"ibot_patch_loss_masked: mask must be a (B, L) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    m = int(mask.sum())
    if student_masked.ndim != 2 or teacher_masked.shape != student_masked.shape or student_masked.shape[0] != m:
        raise ValueError(f"ibot_patch_loss_masked: expected student logits and teacher targets of one shape (M, K) "
                         f"with M = {m} masked tokens, got {tuple(student_masked.shape)} and {tuple(teacher_masked.shape)}")
    if student_temp <= 0:
        raise ValueError(f"ibot_patch_loss_masked: student_temp must be > 0, got {student_temp}")
    b = mask.shape[0]
    log_p = F.log_softmax(student_masked / student_temp, dim=-1)  # (M, K)
    per_token = -(teacher_masked * log_p).sum(dim=-1)  # (M,)
    # Each token weighs 1 / (masked tokens of its image), so every masked image counts once.
    weight = (1.0 / mask.sum(dim=1).clamp_min(1).to(per_token.dtype)).unsqueeze(1).expand_as(mask)[mask]
    return (per_token * weight).sum() / b


@torch.no_grad()
def patch_sinkhorn_targets(teacher_logits: Tensor, mask: Tensor, temperature: float, iterations: int = 3,
                           gather: bool = False) -> Tensor:
    """DINOv2's Sinkhorn-Knopp teacher targets for patch tokens, over the masked tokens only → (B, L, K).

    teacher_logits: (B, L, K) the teacher's patch logits (unmasked view); mask: (B, L) bool. The M masked
    tokens are the samples of one transport problem: exp(t / τ) with uniform marginals, each prototype
    receiving M/K of the mass and each token a distribution over prototypes, 3 iterations as DINOv2's
    ``sinkhorn_knopp_teacher`` (one implementation: :func:`selfsup.losses.clustering.sinkhorn_knopp`). With
    ``gather=True`` M counts the masked tokens of every process (DINOv2 all-reduces ``n_masked_patches``), so
    processes with different numbers of masked tokens, or none, get their rows of the combined problem.
    Unmasked positions are 0 (the loss never reads them).
    """
    _check(teacher_logits, teacher_logits, mask, "patch_sinkhorn_targets")
    codes = sinkhorn_knopp(teacher_logits[mask], temperature, iterations, gather=gather)  # (M, K)
    out = codes.new_zeros(teacher_logits.shape)
    out[mask] = codes
    return out
