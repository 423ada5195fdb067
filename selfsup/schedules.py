"""Every per-iteration schedule in one place: the learning rate (linear warm-up, then a half cosine), its
batch-size scaling, and the method-declared :class:`Schedule` values (teacher momentum, teacher temperature)
that the training loop evaluates once per step from :class:`~selfsup.methods.base.Progress`.

Ground floor: imports nothing from selfsup, so methods, the loop and evaluation all read the same rules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def cosine_schedule(t: float, start: float, end: float) -> float:
    """A value moving from ``start`` (t=0) to ``end`` (t=1) along a half cosine (SGDR, arXiv:1608.03983).

    The one curve behind learning rates, EMA momentum (BYOL: 0.996 → 1), weight decay ramps (DINO: 0.04 → 0.4).
    """
    t = min(max(t, 0.0), 1.0)
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base: float, final: float = 0.0) -> float:
    """``base·(step+1)/warmup`` during warm-up, then cosine from ``base`` to ``final`` over the rest."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return cosine_schedule((step - warmup_steps) / span, base, final)


def scaled_lr(base_lr: float, batch_size: int, rule: str) -> float:
    """Learning-rate scaling with the global batch: ``linear`` lr·B/256 (Goyal et al. 2017,
    arXiv:1706.02677), ``sqrt`` lr·√B (SimCLR, arXiv:2002.05709 appendix B.1), or ``none``."""
    if rule == "linear":
        return base_lr * batch_size / 256
    if rule == "sqrt":
        return base_lr * batch_size ** 0.5
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}")


SHAPES = ("cosine", "warmup")


@dataclass(frozen=True)
class Schedule:
    """A value a method needs per step, declared by the method and evaluated by the loop.

    ``cosine``: from ``start`` at step 0 to ``end`` at the last step along a half cosine (BYOL's and DINO's
    teacher momentum, arXiv:2006.07733 §3.2). ``warmup``: linear from ``start`` to ``end`` over
    ``warmup_epochs`` (fractional) epochs, then constant at ``end`` (DINO's teacher temperature,
    arXiv:2104.14294 §3.1; evaluated per iteration, not per epoch). ``start == end`` is a constant.
    """

    start: float
    end: float
    shape: str = "cosine"
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"schedule shape must be one of {SHAPES}, got {self.shape!r}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be ≥ 0, got {self.warmup_epochs}")

    def at(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        if self.shape == "cosine":
            return cosine_schedule(step / max(1, total_steps), self.start, self.end)
        if self.warmup_epochs == 0:
            return self.end
        t = min(step / (self.warmup_epochs * max(1, steps_per_epoch)), 1.0)
        return self.start + t * (self.end - self.start)
