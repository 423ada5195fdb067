"""Teachers: a frozen copy of the student, updated by one exponential-moving-average rule."""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with every parameter excluded from autograd (a teacher/target network)."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θ_t ← m·θ_t + (1 − m)·θ_s for parameters; buffers (e.g. BN statistics) are copied.

    BYOL (arXiv:2006.07733, eq. 1), MoCo (arXiv:1911.05722, eq. 2), DINO (arXiv:2104.14294, §3.1).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameters")
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


@torch.no_grad()
def update_teachers(pairs: Iterable[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """One EMA step of every (teacher, student) pair a method declares (its ``ema_pairs()``), with this step's
    scheduled momentum: the one teacher update the loop runs after each optimiser step."""
    for teacher, student in pairs:
        ema_update_(teacher, student, momentum)


def check_momentum(method: str, start: float, end: float) -> None:
    """The one check of a method's ``momentum_start``/``momentum_end`` settings (each in [0, 1])."""
    for name, m in (("momentum_start", start), ("momentum_end", end)):
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"{method}: {name} must be in [0, 1], got {m}")
