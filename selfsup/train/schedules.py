"""Per-iteration learning-rate schedule: linear warm-up, then a half cosine (SGDR, arXiv:1608.03983)."""
from __future__ import annotations

from selfsup.nn.ema import cosine_schedule


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
