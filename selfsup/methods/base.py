"""The method contract: what a method is, what it declares, and the one place its optional hooks are read.

There is no method base class. A method is a plain ``nn.Module`` that satisfies :class:`Method`:

- ``spec``: a :class:`MethodSpec` class attribute, everything the loop, the builder and the tests need to
  know before the method runs (views, smallest batch, default backbone, whether it needs sample indices);
- ``backbone``: the encoder being pretrained, with ``num_features``;
- ``forward(x) -> (B, D)``: the backbone features used for evaluation;
- ``training_step(views, progress, **extra) -> (loss, logs)``: wires heads and losses. ``logs`` holds scalar
  tensors (logged without forcing a device sync every step), optionally ``"z"``/``"z_pair"`` ((B, D) detached
  embeddings of one view and of its positives, from which the loop measures collapse), and whatever
  ``after_step`` needs (keys named by the method, e.g. MoCo's new keys): nothing passes between the two
  through attributes. A method whose recipe has no local crops is never given any.

Optional hooks, each read only through the function of the same purpose below:

- ``after_step(progress, logs)``: state updates once the optimiser step is taken (queue pushes, centres) —
  :func:`run_after_step`;
- ``ema_pairs() -> [(teacher, student)]``: modules the loop moves towards their students with the
  ``"teacher_momentum"`` schedule value in one :func:`~selfsup.nn.ema.update_teachers` — :func:`teacher_pairs`;
- ``schedules() -> {name: Schedule}``: per-step values (teacher momentum, teacher temperature) evaluated by
  :func:`make_progress` and read in ``training_step`` as ``progress.value(name)`` — :func:`schedules_of`;
- ``param_groups() -> [{"params": [...], "lr_scale": s, "fixed_lr": bool}]``: parts with their own learning
  rate (a predictor) — :func:`custom_param_groups`;
- ``check_run(n_train, batch_size, recipe) -> [problem, ...]``: checks against the data and the views before
  training starts (a queue larger than the dataset) — :func:`run_checks`;
- ``resolve_params(params) -> params``, a classmethod: the constructor's parameters as the run's ``config.yaml``
  records them, decided once before the method is built (a teacher file by absolute path and SHA-256) —
  :func:`resolved_params`;
- the embed/loss split, for a step computed in micro-batches (``train.micro_batch_size``, GradCache:
  Gao et al. 2021, arXiv:2101.06983; ``MethodSpec.micro_batches = "embeddings"``):
  ``embed(views, progress, **extra) -> {name: (B, …)}``, the per-sample outputs of the networks being trained
  (projections, predictions, logits: first dimension the batch, views side by side as (B, V, …) or one key
  each); optionally ``targets(views, progress, **extra) -> {name: (B, …)}``, what is computed without gradient
  (EMA teachers, momentum encoders: run once, never recomputed); and ``loss_from(embeddings, progress, **extra)
  -> (loss, logs)``, everything batch-wide (negatives, Sinkhorn, covariances, queues read) on the union of the
  two. Such a method's ``training_step`` is :func:`step_from_embeddings` — one code path for the whole batch and
  for micro-batches; ``embed`` must not change state (it runs twice per micro-batch) and ``loss_from`` changes
  none outside ``after_step`` — :func:`embed_of`, :func:`targets_of`, :func:`loss_of`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from selfsup.nn.ema import update_teachers
from selfsup.schedules import Horizon, Schedule
from selfsup.views import ViewRecipe
from selfsup.views.clips import ClipRecipe


@dataclass(frozen=True)
class Progress:
    """Where training stands, passed explicitly to every step (nothing mutates a loss to pass time)."""

    step: int
    """Optimiser steps completed before this one."""
    total_steps: int
    epoch: int
    steps_per_epoch: int
    values: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    """This step's values of the method's :class:`Schedule` s, computed once by :func:`make_progress`."""

    @property
    def fraction(self) -> float:
        """Training progress in [0, 1]; the argument of every per-iteration schedule."""
        return self.step / max(1, self.total_steps)

    def value(self, name: str) -> float:
        """A scheduled value (``"teacher_momentum"``, ``"teacher_temp"``) at this step."""
        if name not in self.values:
            raise KeyError(f"progress holds no scheduled value {name!r} (it has {sorted(self.values)}); build it "
                           "with selfsup.methods.base.make_progress(method, ...) so the method's schedules are evaluated")
        return self.values[name]


@dataclass(frozen=True)
class MethodSpec:
    """What a method declares about itself (a class attribute ``spec``), read by the loop and the builder."""

    views: ViewRecipe | ClipRecipe
    """The paper's views; a run's ``views:`` config overrides fields of it. A :class:`ClipRecipe` for a method that
    takes clips."""
    inputs: str = "images"
    """What the method consumes: ``"images"`` (views (B, C, H, W)) or ``"clips"`` (views (B, C, T, H, W) from a
    :class:`~selfsup.data.clips.ClipSet`); the builder refuses data of the other kind with one line."""
    min_batch_size: int = 2
    default_backbone: str | None = None
    """The backbone a run gets when it names none (a ViT for masked methods)."""
    needs_indices: bool = False
    """``training_step`` also gets ``indices=`` (B,): the batch's positions in the training set (per-sample
    memories: PIRL, DeepCluster-v2)."""
    needs_view_boxes: bool = False
    """``training_step`` also gets ``boxes=``: per view (B, 4), where the view lies in its image
    (:func:`selfsup.views.make_views` with ``with_boxes``), for methods that match locations across views (VICRegL)."""
    stochastic_step: bool = False
    """``training_step`` draws randomness of its own (masks): parity tests compare its loss, not its step."""
    test_params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    """Small constructor settings for the registry-wide tests."""
    min_steps: int = 300
    """Optimisation steps below which a run is warned that the method is unlikely to learn anything beyond a
    random encoder. Orders of magnitude seen in this project's benchmarks: the CNN joint-embedding methods
    gain a few points over their random encoder after a few hundred steps; the masked ViT methods do not beat
    theirs at ~70 steps (benchmarks/two_epochs) and clear it by 6–9 linear points at 640–1,300
    (benchmarks/masked), so they declare more."""
    pictures: tuple[str, ...] = ()
    """What ``selfsup report`` draws from the trained method besides the encoder's pictures:
    ``"reconstructions"`` (the method has ``reconstruct(x) -> (masked input, reconstruction)``: MAE, SimMIM),
    ``"colorization"`` (``predict_chroma(y)``)."""
    test_in_chans: int = 1
    """Image channels of the registry-wide tests' inputs (3 for a method that needs colour)."""
    micro_batches: str | None = None
    """How a step splits into micro-batches with the whole batch's gradients (``train.micro_batch_size``,
    :mod:`selfsup.train.micro`): ``"embeddings"`` — the method has ``embed``/``loss_from`` (module docstring) and its
    batch-wide loss is computed once from the cached embeddings of every chunk (GradCache, arXiv:2101.06983);
    ``"per_sample"`` — its loss is a mean over samples of per-sample terms, so each chunk's loss, scaled by its
    share of the batch, is back-propagated on its own; ``None`` — neither, and ``micro_batch_size`` is refused."""


@runtime_checkable
class Method(Protocol):
    """The required part of the contract (see the module docstring for the optional hooks)."""

    spec: ClassVar[MethodSpec]
    backbone: nn.Module

    def forward(self, x: Tensor) -> Tensor: ...

    def training_step(self, views: list[Tensor], progress: Progress,
                      **extra: Tensor) -> tuple[Tensor, dict[str, Tensor]]: ...


def method_spec(method: nn.Module | type) -> MethodSpec:
    spec = getattr(method, "spec", None)
    if not isinstance(spec, MethodSpec):
        name = method.__name__ if isinstance(method, type) else type(method).__name__
        raise TypeError(f"{name} has no `spec = MethodSpec(...)` class attribute; every method declares one")
    return spec


def schedules_of(method: nn.Module) -> dict[str, Schedule]:
    hook = getattr(method, "schedules", None)
    return dict(hook()) if hook is not None else {}


def make_progress(method: nn.Module, step: int, total_steps: int, epoch: int, steps_per_epoch: int,
                  horizon: Horizon | None = None) -> Progress:
    """The :class:`Progress` of one step with every schedule of ``method`` evaluated: the one place
    per-step method values are computed (the loop calls it; so do tests that drive a method by hand).
    ``horizon``: the run's, when it may have been continued for more epochs — each schedule is then evaluated
    through it (:class:`~selfsup.schedules.Horizon`: no value jumps where the run was continued) and
    ``total_steps`` is its total."""
    if horizon is None:
        values = {name: s.at(step, total_steps, steps_per_epoch) for name, s in schedules_of(method).items()}
    else:
        total_steps = horizon.total_steps
        values = {name: horizon.value(lambda k, n, s=s: s.at(k, n, steps_per_epoch), step)
                  for name, s in schedules_of(method).items()}
    return Progress(step, total_steps, epoch, steps_per_epoch, MappingProxyType(values))


def teacher_pairs(method: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    hook = getattr(method, "ema_pairs", None)
    return list(hook()) if hook is not None else []


def run_after_step(method: nn.Module, progress: Progress, logs: dict[str, Tensor]) -> None:
    hook = getattr(method, "after_step", None)
    if hook is not None:
        hook(progress, logs)


def finish_step(method: nn.Module, progress: Progress, logs: dict[str, Tensor]) -> None:
    """What follows a taken optimiser step, in order: the method's ``after_step`` with what its
    ``training_step`` returned, then one EMA update of every teacher with this step's ``teacher_momentum``."""
    run_after_step(method, progress, logs)
    pairs = teacher_pairs(method)
    if pairs:
        update_teachers(pairs, progress.value("teacher_momentum"))


def custom_param_groups(method: nn.Module) -> list[dict[str, Any]]:
    hook = getattr(method, "param_groups", None)
    return list(hook()) if hook is not None else []


def run_checks(method: nn.Module, n_train: int, batch_size: int, recipe: ViewRecipe) -> list[str]:
    hook = getattr(method, "check_run", None)
    return list(hook(n_train, batch_size, recipe)) if hook is not None else []


def resolved_params(cls: type, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` through the method class's optional ``resolve_params`` (a ``ValueError`` says what is wrong)."""
    hook = getattr(cls, "resolve_params", None)
    return dict(hook(dict(params))) if hook is not None else dict(params)


MICRO_BATCH_KINDS = ("embeddings", "per_sample")


def embed_of(method: nn.Module, views: list[Tensor], progress: Progress, **extra: Tensor) -> dict[str, Tensor]:
    """The method's ``embed``: per-sample outputs (B, …) of what is trained, with gradient where enabled."""
    return dict(method.embed(views, progress, **extra))


def targets_of(method: nn.Module, views: list[Tensor], progress: Progress, **extra: Tensor) -> dict[str, Tensor]:
    """The method's optional ``targets`` (EMA teachers' outputs, (B, …) each), always without gradient."""
    hook = getattr(method, "targets", None)
    if hook is None:
        return {}
    with torch.no_grad():
        return dict(hook(views, progress, **extra))


def loss_of(method: nn.Module, embeddings: dict[str, Tensor], progress: Progress,
            **extra: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The method's ``loss_from`` on the whole batch's embeddings (``embed`` and ``targets`` together)."""
    return method.loss_from(embeddings, progress, **extra)


def step_from_embeddings(method: nn.Module, views: list[Tensor], progress: Progress,
                         **extra: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """``training_step`` of a method with the embed/loss split: ``loss_from(embed ∪ targets)``, the same three calls
    :mod:`selfsup.train.micro` makes chunk by chunk."""
    embeddings = embed_of(method, views, progress, **extra)
    embeddings.update(targets_of(method, views, progress, **extra))
    return loss_of(method, embeddings, progress, **extra)


def by_sample(x: Tensor, batch: int) -> Tensor:
    """(V·B, …) view-major rows (views concatenated along the batch) → (B, V, …), a view of ``x`` (no copy)."""
    return x.unflatten(0, (-1, batch)).transpose(0, 1)


def by_view(x: Tensor) -> Tensor:
    """(B, V, …) → (V·B, …) view-major: the inverse of :func:`by_sample` (no copy when ``x`` came from it)."""
    return x.transpose(0, 1).flatten(0, 1)
