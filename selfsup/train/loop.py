"""The one training loop, in three parts as DINO's ``main_dino.py``: set-up → :func:`train_one_epoch` →
:func:`train_step`.

``pretrain(cfg, run_dir)`` is what ``selfsup pretrain`` runs. Every per-iteration value is computed in one
place per step: the learning rate and weight decay here from the config, the method's own schedules
(teacher momentum, teacher temperature) by :func:`~selfsup.methods.base.make_progress`. A method only wires
its heads and losses; the loop takes the optimiser step, runs the method's ``after_step`` with what its
``training_step`` returned, and moves every EMA teacher in one :func:`~selfsup.nn.ema.update_teachers`.
"""
from __future__ import annotations

import logging
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from selfsup import distributed as dist
from selfsup.config import RunConfig
from selfsup.methods.base import Progress, finish_step, make_progress
from selfsup.monitor.diagnostics import batch_diagnostics
from selfsup.schedules import cosine_schedule, warmup_cosine
from selfsup.train.batches import epoch_batches, epoch_order
from selfsup.train.checkpoint import atomic_save
from selfsup.train.micro import micro_step, uses_micro_batches

from selfsup.train.optim import set_optim_values
from selfsup.config import compile_mode
from selfsup.train.setup import (Run, TrainingError, knn_monitor, record_compile_time, record_startup, save_checkpoint,
                                 setup_run)
from selfsup.views import make_views
from selfsup.views.clips import ClipRecipe, make_clip_views

log = logging.getLogger("selfsup")
__all__ = ["pretrain", "train_one_epoch", "train_step", "StepResult", "TrainingError", "Run"]


@dataclass
class StepResult:
    """What one optimiser step produced: the detached loss, the method's logs, the scheduled values used."""

    loss: Tensor
    logs: dict[str, Tensor]
    lr: float
    finite: bool
    values: dict[str, float] = field(default_factory=dict)


class _StopFlag:
    """Set by SIGTERM (how clusters pre-empt): the loop saves a checkpoint and exits cleanly."""

    def __init__(self) -> None:
        self.set = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.set = True

    def requested(self, device: torch.device) -> bool:
        """True on every rank once any rank was signalled, so all stop at the same step."""
        if dist.world_size() == 1:
            return self.set
        flag = torch.tensor([float(self.set)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def pretrain(cfg: RunConfig, run_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Pretrain ``cfg`` into ``run_dir``, resuming from ``checkpoints/last.pt`` when it exists.

    Returns the last epoch's summary (loss, images/s, kNN accuracy, diagnostics).
    """
    run = setup_run(cfg, Path(run_dir), overwrite)
    summary: dict[str, Any] = {}
    status = "FAILED"
    try:
        with _StopFlag() as stop:
            for epoch in range(run.step // run.steps_per_epoch, cfg.train.epochs):
                summary = train_one_epoch(run, epoch, stop)
        if run.main:
            atomic_save(run.model.backbone.state_dict(), run.run_dir / "encoder.pt")
        status = "FINISHED"
    except (SystemExit, KeyboardInterrupt):  # SIGTERM or Ctrl-C: the run is resumable
        status = "KILLED"
        raise
    finally:
        if run.trackers is not None:  # finished: the encoder and the config as artifacts; the trackers' runs end
            done = status == "FINISHED"
            run.trackers.close([run.run_dir / n for n in ("encoder.pt", "encoder.json", "config.yaml")] if done
                               else None, status)
    return summary


def train_one_epoch(run: Run, epoch: int, stop: _StopFlag) -> dict[str, Any]:
    """One pass over this rank's share of the data, from wherever a resumed run stopped; returns the summary."""
    t = run.cfg.train
    first = run.step - epoch * run.steps_per_epoch
    bar = _progress_bar(t.progress and run.main, run.steps_per_epoch, first, epoch, t.epochs)
    run.model.train()
    clock = _Throughput()
    logs: dict[str, Tensor] = {}
    compiled_in_epoch = None
    order = epoch_order(len(run.data.train), t.seed, epoch)
    for i, idx, x, aspect in epoch_batches(run.data.train, run.resident, order, first, run.steps_per_epoch,
                                           t.batch_size, run.rank, run.world, run.device):
        progress = make_progress(run.model, run.step, run.total_steps, epoch, run.steps_per_epoch, run.horizon)
        t0 = time.perf_counter()
        result = train_step(run, x, idx, progress, aspect)
        if run.compile_s is None and compile_mode(t.compile) != "off":
            record_compile_time(run, time.perf_counter() - t0)
            compiled_in_epoch = run.compile_s
        if not result.finite:
            _skip(run, result, epoch)
            continue
        run.bad_in_row = 0
        run.step += 1
        if not run.startup.done:
            record_startup(run)
        logs = result.logs
        clock.count(t.batch_size)
        if run.step % t.log_every == 0 or i == run.steps_per_epoch - 1:
            _log_step(run, result, epoch, clock, bar)
        if bar is not None:
            bar.update(1)
        if t.checkpoint_steps and run.step % t.checkpoint_steps == 0 and i < run.steps_per_epoch - 1:
            save_checkpoint(run, epoch_done=False)
        if stop.requested(run.device):
            save_checkpoint(run, epoch_done=False)
            if bar is not None:
                bar.close()
            log.warning("SIGTERM: saved %s at step %d; run the same command to resume", run.ckpt_path, run.step)
            raise SystemExit(143)
    if bar is not None:
        bar.close()
    summary = _epoch_summary(run, epoch, clock, logs)
    if compiled_in_epoch is not None:
        summary["compile_s"] = compiled_in_epoch
    run.metrics.write(summary)
    save_checkpoint(run, epoch_done=True)
    if run.main:
        _print_summary(summary, t.epochs)
    return summary


def train_step(run: Run, x: Tensor, idx: Tensor, progress: Progress, aspect: Tensor | None = None) -> StepResult:
    """Views on the device, the method's loss, backward, a finite check, the optimiser step, then the method's
    state updates and the teachers' EMA. A non-finite loss or gradient takes no step (``finite=False``). With
    ``train.micro_batch_size`` the loss and backward are :func:`~selfsup.train.micro.micro_step`'s, chunk by chunk.
    ``aspect`` (B,): the images' original width / height when they are whole images squashed to squares (an
    image-folder cache), so crops are drawn in the original pixel space."""
    cfg = run.cfg
    lr, wd = learning_rate(run, progress.step), weight_decay(run, progress.step)
    set_optim_values(run.optimizer, lr, run.base_lr, wd)
    # a method with ``needs_indices`` (a per-sample memory) also gets the batch's positions in the training set,
    # one with ``needs_view_boxes`` where each view lies in its image
    extra = {"indices": idx} if run.spec.needs_indices else {}
    with torch.no_grad():
        if isinstance(run.recipe, ClipRecipe):
            views = make_clip_views(x, run.recipe, run.data.mean, run.data.std, aspect)
        else:
            views = make_views(x, run.recipe, run.data.mean, run.data.std, aspect, with_boxes=run.spec.needs_view_boxes)
    if run.spec.needs_view_boxes:
        views, extra["boxes"] = views
    if run.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    if uses_micro_batches(run, views[0].shape[0]):  # train.micro_batch_size: forward and backward chunk by chunk
        run.optimizer.zero_grad(set_to_none=True)
        loss, logs = micro_step(run, views, progress, extra)
        finite = bool(torch.isfinite(loss))
    else:
        with torch.autocast(run.device.type, dtype=run.amp_dtype) if run.amp_dtype else nullcontext():
            loss, logs = run.stepper(views, progress, **extra)
        loss = loss.float()
        run.optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
    if finite:
        finite = _grads_finite(run.trainable, cfg.optim.clip_grad)
    result = StepResult(loss.detach(), logs, lr, finite, dict(progress.values))
    if not finite:
        run.optimizer.zero_grad(set_to_none=True)
        return result
    run.optimizer.step()
    finish_step(run.model, progress, logs)
    return result


def learning_rate(run: Run, step: int) -> float:
    """The learning rate of ``step``: linear warm-up (``optim.warmup_epochs``), then a half cosine to
    ``lr × min_lr_ratio`` at the run's last step, through its :class:`~selfsup.schedules.Horizon` (a run continued
    for more epochs joins the longer schedule without a jump)."""
    o, spe = run.cfg.optim, run.steps_per_epoch

    def planned(s: int, total: int) -> float:  # on a run planned for ``total`` steps
        warmup = min(int(o.warmup_epochs * spe), total - 1)
        return warmup_cosine(s, total, warmup, run.base_lr, run.base_lr * o.min_lr_ratio)

    return run.horizon.value(planned, step)


def weight_decay(run: Run, step: int) -> float:
    """The weight decay of ``step``: ``weight_decay`` → ``weight_decay_end`` along a half cosine over the run
    (constant without an end), through its horizon as :func:`learning_rate`."""
    o = run.cfg.optim
    end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
    return run.horizon.value(lambda s, total: cosine_schedule(s / max(1, total), o.weight_decay, end), step)


def _grads_finite(params: list[Tensor], clip: float | None) -> bool:
    """Whether every gradient is finite; with ``clip`` the global norm is clipped on the way (one reduction)."""
    if clip:
        return bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(params, clip)))
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


def _scalar_logs(logs: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items() if not isinstance(v, Tensor) or v.numel() == 1}


def _skip(run: Run, result: StepResult, epoch: int) -> None:
    """A non-finite step: logged and counted; too many in a row stop the run with the last checkpoint intact."""
    run.bad_in_row, run.bad_total = run.bad_in_row + 1, run.bad_total + 1
    terms, loss = _scalar_logs(result.logs), float(result.loss)
    log.warning("step %d: non-finite loss or gradient (loss %s, lr %.4g, terms %s); step skipped",
                run.step, loss, result.lr, terms)
    run.metrics.write({"step": run.step, "epoch": epoch + 1, "skipped": True, "loss": loss, "lr": result.lr})
    if run.bad_in_row >= run.cfg.train.max_bad_steps:
        raise TrainingError(
            f"stopped at step {run.step}: {run.bad_in_row} consecutive steps with a NaN/Inf loss or gradient "
            f"(last loss {loss}, terms {terms}, lr {result.lr:.4g}). The last good checkpoint, {run.ckpt_path}, "
            "is intact; lower the learning rate or enable optim.clip_grad.")


class _Throughput:
    """Images per second since the epoch began and since the last logged step."""

    def __init__(self) -> None:
        self.t0 = self.window_t0 = time.perf_counter()
        self.images = self.window_images = 0
        self.loss_sum, self.loss_n = 0.0, 0

    def count(self, images: int) -> None:
        self.images += images
        self.window_images += images

    def window(self) -> float:
        now = time.perf_counter()
        ips = self.window_images / max(now - self.window_t0, 1e-9)
        self.window_t0, self.window_images = now, 0
        return ips


def _log_step(run: Run, result: StepResult, epoch: int, clock: _Throughput, bar) -> None:
    """One metrics line: loss, lr, images/s, the method's scalar logs, collapse diagnostics and warnings."""
    loss = float(result.loss)
    clock.loss_sum, clock.loss_n = clock.loss_sum + loss, clock.loss_n + 1
    ips = clock.window()
    record = {"step": run.step, "epoch": epoch + 1, "loss": loss, "lr": result.lr, "images_per_s": ips,
              **_scalar_logs(result.logs)}
    if "z" in result.logs:
        record.update(batch_diagnostics(result.logs["z"], result.logs.get("z_pair")))
        record.update(run.collapse.update(run.step, record, result.logs["z"]))  # {"collapse_warning": …} when it fires
    run.metrics.write(record)
    if run.cfg.train.stop_on_collapse and run.collapse.should_stop():
        raise TrainingError(f"stopped at step {run.step}: {run.collapse.stop_message()}. Checkpoints of finished "
                            f"epochs are kept in {run.ckpt_path.parent}; fix the recipe (see the warning).")
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}")


def _epoch_summary(run: Run, epoch: int, clock: _Throughput, logs: dict[str, Tensor]) -> dict[str, Any]:
    train_time = time.perf_counter() - clock.t0
    t = run.cfg.train
    knn = knn_monitor(run) if t.knn_every and (epoch + 1) % t.knn_every == 0 else None
    summary = {"step": run.step, "epoch": epoch + 1, "loss": clock.loss_sum / max(clock.loss_n, 1),
               "images_per_s": clock.images / max(train_time, 1e-9), "knn": knn, "epoch_time_s": train_time,
               "skipped_steps": run.bad_total}
    if "z" in logs:
        summary.update(batch_diagnostics(logs["z"], logs.get("z_pair")))
    return summary


def _progress_bar(enabled: bool, total: int, initial: int, epoch: int, epochs: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", leave=False, file=sys.stderr,
                dynamic_ncols=True, unit="step")


def _print_summary(s: dict[str, Any], epochs: int) -> None:
    # no kNN field on an epoch the monitor skipped (train.knn_every) or where there are no labels
    knn = "" if s["knn"] is None else f"  knn {100 * s['knn']:.2f}%"
    rank = f"  rank {s['rank']:.1f}" if "rank" in s else ""
    spread = f"  spread {s['spread']:.3f} (healthy {s['spread_healthy']:.3f})" if "spread" in s else ""
    print(f"epoch {s['epoch']}/{epochs}  loss {s['loss']:.4f}  {s['images_per_s']:.0f} img/s"
          f"{knn}{spread}{rank}  {s['epoch_time_s']:.1f}s", flush=True)

