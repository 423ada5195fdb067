"""What iBOT and DINOv2 share: the student on two masked global views plus whole local crops, the teacher on the
whole global views, and the checks of their settings (masks, head widths, temperature warm-ups).

iBOT (Zhou et al. 2022, arXiv:2111.07832) and DINOv2 (Oquab et al. 2024, arXiv:2304.07193) differ in their
targets (running centre vs Sinkhorn-Knopp), heads (shared vs untied) and regulariser (KoLeo), not in how the
views reach the encoder; each method's file says what is its own.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from selfsup.methods.dino import DINOHead
from selfsup.nn.masking import check_mask_ratio
from selfsup.views import group_by_size

if TYPE_CHECKING:
    from selfsup.nn.vit_model import ViT


class StudentOutputs(NamedTuple):
    """The student's side of one iBOT/DINOv2 step."""

    cls_logits: list[Tensor]
    """V (B, K) [CLS] head logits: the two masked global views, then every local crop."""
    patch_logits: Tensor
    """(M, K') patch-head logits of the global views' M masked tokens, in ``x[masks]`` order (nothing else is read)."""
    cls_features: Tensor
    """(2B, D) backbone [CLS] outputs of the masked global views (DINOv2's KoLeo)."""
    cls_embed: Tensor
    """(2B, bottleneck) l2-normalised [CLS] head embeddings of the global views (the collapse monitor's z)."""


def student_outputs(vit: ViT, mask_token: Tensor, cls_head: DINOHead, patch_head: DINOHead, views: list[Tensor],
                    masks: Tensor, frozen: bool) -> StudentOutputs:
    """The student on the masked global views (stacked along B: view 0, then view 1) and the whole local crops.

    ``masks`` (2B, L) bool, True = mask token. Only the masked tokens go through the patch head (the patch loss
    reads nothing else); local crops of one size run through the backbone together.
    ``frozen``: the last layers' gradients are cut (the first epoch's freeze)."""
    tokens = vit.encode_with_mask_tokens(torch.cat(views[:2]), masks, mask_token)  # (2B, 1 + L, D)
    cls_features = vit.cls_output(tokens)
    cls_embed = cls_head.embed(cls_features)
    cls_logits: list[Tensor] = [*cls_head.logits(cls_embed, frozen).chunk(2), *([None] * (len(views) - 2))]
    for idx, x in group_by_size(views[2:]):  # the heads read the [CLS] token, whatever the backbone's pooling
        out = cls_head.logits(cls_head.embed(vit.cls_output(vit.encode(vit.patch_tokens(x)))), frozen)
        for i, o in zip(idx, out.chunk(len(idx))):
            cls_logits[2 + i] = o
    patch_logits = patch_head.logits(patch_head.embed(vit.patch_outputs(tokens)[masks]), frozen)  # (M, K')
    return StudentOutputs(cls_logits, patch_logits, cls_features, cls_embed)


@torch.no_grad()
def teacher_tokens(teacher: ViT, views: list[Tensor]) -> Tensor:
    """(2B, 1 + L, D): the teacher's outputs for the two whole global views (stacked along B)."""
    return teacher.encode(teacher.patch_tokens(torch.cat(views[:2])))


def check_masking(method: str, mask_ratio: tuple[float, float], mask_probability: float) -> None:
    """The blockwise masks' settings, checked when the method is built rather than at its first step."""
    if len(mask_ratio) != 2 or mask_ratio[0] > mask_ratio[1]:
        raise ValueError(f"{method}: mask_ratio must be (low, high) with low ≤ high, got {mask_ratio}")
    for r in mask_ratio:
        try:
            check_mask_ratio(r)
        except ValueError as exc:
            raise ValueError(f"{method}: mask_ratio {tuple(mask_ratio)}: {exc} (blockwise masks hide a ratio drawn "
                             "in this range per image; iBOT and DINOv2 use (0.1, 0.5))") from None
    if not 0.0 < mask_probability <= 1.0:
        raise ValueError(f"{method}: mask_probability must be in (0, 1] (the share of images that are masked; "
                         f"0.5 in iBOT and DINOv2), got {mask_probability}")


def check_heads(method: str, **widths: int) -> None:
    bad = {k: v for k, v in widths.items() if v < 1}
    if bad:
        raise ValueError(f"{method}: head widths must be ≥ 1, got {bad}")


def check_temperatures(method: str, student_temp: float, pairs: dict[str, tuple[float, float]]) -> None:
    """Temperatures > 0 and every warm-up rising (``name: (warm-up start, final)``)."""
    problems = [f"student_temp must be > 0, got {student_temp}"] if student_temp <= 0 else []
    for name, (start, end) in pairs.items():
        if start <= 0 or end <= 0:
            problems.append(f"{name} temperatures must be > 0, got warm-up {start} and final {end}")
        elif end < start:
            problems.append(f"the {name} temperature warms up from {start} to {end}: the final value must be ≥ the "
                            "warm-up value")
    if problems:
        raise ValueError(f"{method}: " + "; ".join(problems))
