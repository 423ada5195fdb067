"""Every per-iteration schedule in one place: the learning rate (linear warm-up, then a half cosine), its
batch-size scaling, and the method-declared :class:`Schedule` values (teacher momentum, teacher temperature)
that the training loop evaluates once per step from :class:`~selfsup.methods.base.Progress`; and the
:class:`Horizon` they span, which grows when a finished run is continued for more epochs.

Ground floor: imports nothing from selfsup, so methods, the loop and evaluation all read the same rules.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable


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


@dataclass(frozen=True)
class Continuation:
    """A run continued for more epochs: at ``step`` (the checkpoint it continued from) its schedules' horizon
    grew from ``from_steps`` to ``to_steps``, entered over ``blend_steps`` steps (:class:`Horizon`)."""

    step: int
    from_steps: int
    to_steps: int
    blend_steps: int


CONTINUATION_RULE = ("every schedule (lr, weight decay, the method's) becomes the schedule of a run planned for "
                     "the new total; over the blend_steps steps after the continuation step it moves linearly from "
                     "the value of the last step taken to the new schedule's value at the end of that window, "
                     "then follows the new schedule")
"""What :class:`Horizon` does at a continuation, in words, as the run directory records it."""


@dataclass(frozen=True)
class Horizon:
    """The steps a run's schedules span: ``planned`` at its start, then each :class:`Continuation`.

    A run continued for more epochs (``selfsup pretrain`` again with a larger ``--epochs``) follows the schedules
    of a run planned for the new total — so its learning rate decays to its minimum again at the new end, and the
    teacher momentum reaches 1 there — entered smoothly: from the continuation step ``c`` to ``c + W`` every value
    moves linearly from the one it had reached (step ``c - 1``, under the old horizon) to the new schedule's value
    at ``c + W``. Without the blend, the extended cosine would make the learning rate jump up at ``c`` (it is
    higher at ``c / new_total`` than at the end of the old one); restarting a cosine from the reached value instead
    would keep the learning rate of a finished run near its minimum (0 by default), so that the added epochs
    hardly train. A run that was never continued is exactly ``at(step, planned)``.
    """

    planned: int
    continuations: tuple[Continuation, ...] = ()

    @property
    def total_steps(self) -> int:
        return self.continuations[-1].to_steps if self.continuations else self.planned

    def value(self, at: Callable[[int, int], float], step: int) -> float:
        """A schedule's value at ``step`` of this run; ``at(step, total_steps)`` is its value on a run planned for
        ``total_steps`` (e.g. ``lambda s, n: cosine_schedule(s / n, 0.996, 1.0)``)."""
        return self._value(at, step, len(self.continuations))

    def _value(self, at: Callable[[int, int], float], step: int, n: int) -> float:
        for k in range(n - 1, -1, -1):  # the latest of the first n continuations at or before ``step``
            c = self.continuations[k]
            if step < c.step:
                continue
            end = c.step + c.blend_steps
            if step >= end or c.step == 0:
                return at(step, c.to_steps)
            reached, target = self._value(at, c.step - 1, k), at(end, c.to_steps)
            return reached + (target - reached) * (step - c.step + 1) / (c.blend_steps + 1)
        return at(step, self.planned)

    def continued(self, step: int, total_steps: int, blend_steps: int) -> "Horizon":
        """This horizon continued at ``step`` to ``total_steps``, entered over ``blend_steps`` (clipped to what is
        left) steps."""
        if total_steps <= self.total_steps:
            raise ValueError(f"a continuation must add steps: {self.total_steps} → {total_steps}")
        blend = max(0, min(blend_steps, total_steps - step))
        return Horizon(self.planned, self.continuations + (Continuation(step, self.total_steps, total_steps, blend),))

    def state_dict(self) -> dict[str, Any]:
        return {"planned": self.planned, "continuations": [dataclasses.asdict(c) for c in self.continuations]}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, planned: int) -> "Horizon":
        """From :meth:`state_dict`; ``None`` (a checkpoint written before horizons were saved): ``planned``."""
        if not state:
            return cls(planned)
        return cls(int(state["planned"]), tuple(Continuation(**{k: int(v) for k, v in c.items()})
                                                for c in state.get("continuations", [])))
