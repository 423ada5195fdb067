"""Micro-batches: a step over a batch larger than memory allows, with the whole batch's loss and gradients
(``train.micro_batch_size``).

Each process's batch of B is split into n = ⌈B / m⌉ chunks of near-equal size (``torch.tensor_split``: sizes
differ by at most one, none above m; no remainder is dropped; m ≥ B is the whole-batch step). How the chunks
combine is the method's ``MethodSpec.micro_batches``:

- ``"embeddings"`` — **GradCache** (Gao, Zhang, Han, Callan 2021, *Scaling Deep Contrastive Learning Batch Size
  under Memory Limited Setup*, arXiv:2101.06983), for losses that compare samples (negatives, Sinkhorn codes,
  covariances, whitening):

  1. every chunk through the method's ``embed`` without gradient (the CPU/CUDA random state before it kept), then
     its ``targets`` (EMA teachers: computed once, here, never again);
  2. ``loss_from`` once, on the whole batch's embeddings made leaves: the loss, the logs, ∂L/∂embedding for every
     sample, and ∂L/∂θ for parameters the loss uses itself (SwAV's and MSN's prototypes);
  3. every chunk through ``embed`` again, with gradient and the same random draws (dropout, drop-path, masks: the
     kept state restored, GradCache's ``RandContext``), back-propagating the cached ∂L/∂embedding
     (``Σ ⟨e, ∂L/∂e⟩``), so parameter gradients accumulate to the whole batch's.

  It costs one more forward of the student per step; memory is one chunk's graph, the batch's embeddings and
  the loss's own graph over the whole batch (SimCLR's 2B × 2B similarities).
- ``"per_sample"`` — plain accumulation, for losses that are a mean over samples of per-sample terms (masked
  image modelling, pretext tasks, BYOL, SimSiam, DINO): each chunk's ``training_step``, its loss scaled by the
  chunk's share of the batch, back-propagated on its own. Logs: a tensor whose first dimension is each chunk's
  size is per-sample and concatenated, anything else a batch mean, averaged with the same shares (an exact
  batch mean where the log is a mean over samples, e.g. DINO's teacher mean; ratios such as colorization's R²
  become the mean of the chunks').

The one difference from the whole batch is **BatchNorm**: in training its batch statistics are those of a chunk
(as with plain gradient accumulation anywhere). Its running statistics move once per chunk, in the pass with
gradient: GradCache's no-gradient pass of ``embed`` restores them (:func:`running_stats_kept`), so they are not
updated twice; teachers' move in ``targets``, once. **DDP**: every chunk but the last runs under ``no_sync``,
so gradients are all-reduced once per step, in the last chunk's backward; the loss's own parameter gradients
join that backward (``Σ ⟨θ, ∂L/∂θ⟩``) so the reducer sees every parameter there. Autocast wraps each forward as
in the whole-batch step; the finite check, clipping, the optimiser step and ``after_step`` (with the whole batch's
logs) are the loop's, unchanged. ``train.compile: on`` (the whole step as one graph) does not combine with it.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from selfsup.losses.precision import at_least_f32
from selfsup.methods.base import MICRO_BATCH_KINDS, Progress, embed_of, loss_of, method_spec, targets_of

if TYPE_CHECKING:
    from selfsup.train.setup import Run

Autocast = Callable[[], AbstractContextManager]


def chunk_slices(batch: int, size: int) -> list[slice]:
    """⌈batch / size⌉ contiguous slices of near-equal length (``tensor_split``'s: the first ``batch mod n`` one
    longer), none longer than ``size``."""
    if size < 1:
        raise ValueError(f"micro_batch_size must be ≥ 1, got {size}")
    n = -(-batch // size)
    base, longer = divmod(batch, n)
    bounds = [0]
    for i in range(n):
        bounds.append(bounds[-1] + base + (i < longer))
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def refusal(method: str, kind: str | None) -> str | None:
    """The one line refusing ``train.micro_batch_size`` for a method that supports neither way, else None."""
    if kind in MICRO_BATCH_KINDS:
        return None
    return (f"train.micro_batch_size: {method} cannot split a batch into micro-batches with the whole batch's "
            "gradients: its loss is not a mean of per-sample terms and it has no embed/loss_from split for "
            "GradCache (MethodSpec.micro_batches is unset: e.g. a memory bank written during the step, masks "
            "collated over the batch). Remove train.micro_batch_size and lower train.batch_size to fit memory")


def micro_problems(model: nn.Module, method: str, size: int | None, per_process: int) -> list[str]:
    """What stops ``train.micro_batch_size`` = ``size`` for this method at this per-process batch."""
    if size is None:
        return []
    line = refusal(method, method_spec(model).micro_batches)
    if line:
        return [line]
    parts = chunk_slices(per_process, size)
    smallest = min(p.stop - p.start for p in parts)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if len(parts) > 1 and smallest < 2 and has_bn:
        return [f"train.micro_batch_size={size} leaves chunks of {smallest} image(s) of the {per_process} per "
                f"process, and {method}'s networks have BatchNorm, which needs ≥ 2 samples in training; use a "
                "micro_batch_size ≥ 2"]
    return []


def uses_micro_batches(run: Run, batch: int) -> bool:
    """Whether this step is split: ``train.micro_batch_size`` is set and smaller than the batch."""
    size = run.cfg.train.micro_batch_size
    return size is not None and size < batch


def micro_step(run: Run, views: list[Tensor], progress: Progress,
               extra: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
    """The loop's micro-batched forward and backward (:func:`accumulate` with the run's stepper and autocast).
    Gradients must have been zeroed; on return they hold the whole batch's."""
    dtype = run.amp_dtype
    autocast: Autocast = (lambda: torch.autocast(run.device.type, dtype=dtype)) if dtype else nullcontext
    return accumulate(run.model, views, progress, extra, run.cfg.train.micro_batch_size, stepper=run.stepper,
                      autocast=autocast, params=run.trainable)


def accumulate(method: nn.Module, views: list[Tensor], progress: Progress, extra: dict[str, Any], size: int, *,
               stepper: nn.Module | None = None, autocast: Autocast = nullcontext,
               params: Sequence[Tensor] | None = None,
               kind: str | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward and backward of one step in chunks of at most ``size`` samples (module docstring); parameter
    gradients are added to ``.grad``. Returns the whole batch's loss (detached, at least fp32) and logs.

    views: V tensors (B, C, H, W); ``extra`` (``indices`` (B,), ``boxes``: per view (B, 4)) is split with them.
    ``stepper``: the module whose forward runs the method (the run's DDP wrapper), so chunks go through it;
    ``params``: the trainable parameters (default: the method's); ``kind``: GradCache (``"embeddings"``) or
    ``"per_sample"`` instead of the method's declaration (tests)."""
    kind = kind or method_spec(method).micro_batches
    line = refusal(type(method).__name__, kind)
    if line:
        raise ValueError(line)
    parts = chunk_slices(views[0].shape[0], size)
    params = [p for p in (method.parameters() if params is None else params) if p.requires_grad]
    if kind == "embeddings":
        return _grad_cache(method, views, progress, extra, parts, stepper, autocast, params)
    return _per_sample(method, views, progress, extra, parts, stepper, autocast)


def _take(value: Any, part: slice) -> Any:
    """One chunk of a batch-first tensor, or of each tensor of a list/tuple (views, per-view boxes) or dict (the
    extra arguments)."""
    if isinstance(value, Tensor):
        return value[part]
    if isinstance(value, dict):
        return {k: _take(v, part) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_take(v, part) for v in value)
    return value


def _through(stepper: nn.Module | None, method: nn.Module, part: Callable[..., Any] | None, views: list[Tensor],
             progress: Progress, extra: dict[str, Any]) -> Any:
    """``part(method, views, progress, **extra)`` (``training_step`` when None), inside the stepper's forward when
    there is one (DDP prepares its reducer for the backward that follows)."""
    if stepper is not None:
        return stepper(views, progress, part=part, **extra)
    return part(method, views, progress, **extra) if part else method.training_step(views, progress, **extra)


def _sync(stepper: nn.Module | None, last: bool) -> AbstractContextManager:
    """DDP's ``no_sync`` on every chunk but the last: one gradient all-reduce per step."""
    no_sync = getattr(stepper, "no_sync", None)
    return nullcontext() if last or no_sync is None else no_sync()


class RandState:
    """The CPU generator's state (and the CUDA device's, on CUDA) before a chunk's first pass, replayed for its
    second, so dropout, drop-path and masks draw the same (GradCache's ``RandContext``, arXiv:2101.06983 §3.2)."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.device = device
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        """The kept state for the block; the generators' state from before the block afterwards."""
        devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


@contextmanager
def running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Normalisation layers' running statistics (and batch counts) as they were before the block: a pass whose
    forward is repeated with gradient must not move them twice."""
    norms = [m for m in module.modules() if isinstance(m, _NormBase) and m.track_running_stats and m.training]
    saved = [{name: b.clone() for name, b in m.named_buffers(recurse=False) if b is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for name, value in buffers.items():
                    getattr(m, name).copy_(value)


class _Recompute:
    """One chunk's second pass (GradCache's step 3), run inside the stepper's forward: ``embed`` with gradient and the
    chunk's random draws replayed. Returns the scalar ``Σ ⟨e, ∂L/∂e⟩ (+ Σ ⟨θ, ∂L/∂θ⟩)`` whose backward gives each
    embedding its cached gradient (and the loss's own parameters theirs, on the last chunk)."""

    def __init__(self, state: RandState, grads: dict[str, Tensor], param_grads: list[tuple[Tensor, Tensor]],
                 autocast: Autocast):
        self.state, self.grads, self.param_grads, self.autocast = state, grads, param_grads, autocast

    def __call__(self, method: nn.Module, views: list[Tensor], progress: Progress, **extra: Any) -> Tensor:
        with self.state.replay(), self.autocast():
            emb = embed_of(method, views, progress, **extra)
        terms = [(at_least_f32(emb[k]) * at_least_f32(g)).sum() for k, g in self.grads.items() if emb[k].requires_grad]
        terms += [(p * g).sum() for p, g in self.param_grads]
        return torch.stack(terms).sum() if terms else torch.zeros(())


def _grad_cache(method: nn.Module, views: list[Tensor], progress: Progress, extra: dict[str, Any],
                parts: list[slice], stepper: nn.Module | None, autocast: Autocast,
                params: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    device = views[0].device
    states, student, teacher = [], [], []
    with torch.no_grad():
        for part in parts:
            v, e = _take(views, part), _take(extra, part)
            states.append(RandState(device))
            with autocast(), running_stats_kept(method):
                student.append(embed_of(method, v, progress, **e))
            with autocast():
                teacher.append(targets_of(method, v, progress, **e))
    leaves = {k: torch.cat([c[k] for c in student]) for k in student[0]}
    leaves = {k: t.requires_grad_() if t.is_floating_point() else t for k, t in leaves.items()}
    embeddings = {**leaves, **{k: torch.cat([c[k] for c in teacher]) for k in teacher[0]}}
    del student, teacher
    with autocast():
        loss, logs = loss_of(method, embeddings, progress, **extra)
    loss = at_least_f32(loss)
    logs = {k: v.detach() if isinstance(v, Tensor) else v for k, v in logs.items()}
    if not torch.isfinite(loss):  # no step will be taken: no second pass
        return loss.detach(), logs
    wanted = [k for k, t in leaves.items() if t.requires_grad]
    grads = torch.autograd.grad(loss, [leaves[k] for k in wanted] + params, allow_unused=True)
    emb_grads = {k: g for k, g in zip(wanted, grads) if g is not None}
    param_grads = [(p, g) for p, g in zip(params, grads[len(wanted):]) if g is not None]
    del grads, embeddings, leaves
    for i, (part, state) in enumerate(zip(parts, states)):
        last = i == len(parts) - 1
        piece = _Recompute(state, {k: g[part] for k, g in emb_grads.items()}, param_grads if last else [], autocast)
        with _sync(stepper, last):
            surrogate = _through(stepper, method, piece, _take(views, part), progress, _take(extra, part))
            if surrogate.requires_grad:
                surrogate.backward()
    return loss.detach(), logs


def _per_sample(method: nn.Module, views: list[Tensor], progress: Progress, extra: dict[str, Any],
                parts: list[slice], stepper: nn.Module | None,
                autocast: Autocast) -> tuple[Tensor, dict[str, Tensor]]:
    batch = views[0].shape[0]
    total: Tensor | float = 0.0
    pieces: list[tuple[int, dict[str, Any]]] = []
    for i, part in enumerate(parts):
        n = part.stop - part.start
        with _sync(stepper, i == len(parts) - 1):
            with autocast():
                loss, logs = _through(stepper, method, None, _take(views, part), progress, _take(extra, part))
            loss = at_least_f32(loss)
            if not torch.isfinite(loss):  # the step is skipped: no point in the other chunks
                return loss.detach(), logs
            (loss * (n / batch)).backward()
        total = total + loss.detach() * (n / batch)
        pieces.append((n, logs))
    return total, merge_logs(pieces, batch)


def merge_logs(pieces: list[tuple[int, dict[str, Any]]], batch: int) -> dict[str, Any]:
    """The chunks' logs as one batch's: per-sample tensors (first dimension the chunk's size, in every chunk)
    concatenated, everything else averaged with weights chunk size / batch."""
    out: dict[str, Any] = {}
    for key in pieces[0][1]:
        values = [(n, logs[key]) for n, logs in pieces]
        if all(isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n for n, v in values):
            out[key] = torch.cat([v.detach() for _, v in values])
        elif all(isinstance(v, (Tensor, float, int)) and not isinstance(v, bool) for _, v in values):
            out[key] = sum((v.detach() if isinstance(v, Tensor) else v) * (n / batch) for n, v in values)
        else:
            out[key] = values[-1][1]
    return out
