"""What every method shares: the step-progress record and the view/batch declarations.

There is no method base class. A method is a plain ``nn.Module`` with
``forward(x) -> (B, D)`` features, ``training_step(views, progress) -> (loss, logs)``, an optional
``after_step(progress)``, and two class attributes: ``views`` (a :class:`ViewRecipe`) and
``min_batch_size``. Optional hooks: ``check_run(n_train, batch_size, recipe) -> list[str]`` (problems
found before training starts), ``ema_pairs() -> [(teacher, student)]`` with ``momentum(progress)`` for
methods with EMA teachers, ``default_backbone`` (a registered backbone name), ``needs_indices = True``
(``training_step`` then also gets ``indices=``, the batch's positions in the training set, for per-sample
memories: DeepCluster-v2, PIRL) and ``test_params`` (small constructor settings for the registry tests). A
method whose recipe has no local crops is never given any (multi-crop is opt-in by declaring them). Optimiser parameter groups come from an optional ``param_groups()`` returning
``[{"params": [...], "lr_scale": float, ...}]`` (e.g. a predictor with its own learning rate).

``logs`` holds scalar tensors (logged without forcing a device sync every step) and, optionally,
``"z"``: (B, D) embeddings of one view with ``"z_pair"``: (B, D) those of its positives, detached,
from which the loop measures collapse (embedding spread, effective rank, energy gap).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """Where training stands, passed explicitly to every step (nothing mutates a loss to pass time)."""

    step: int
    """Optimiser steps completed before this one."""
    total_steps: int
    epoch: int
    steps_per_epoch: int

    @property
    def fraction(self) -> float:
        """Training progress in [0, 1]; the argument of every per-iteration schedule."""
        return self.step / max(1, self.total_steps)
