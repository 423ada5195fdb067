"""Set-up of a pretraining run: data, model, optimiser, run directory, resume; and the checkpoint it writes.

:func:`setup_run` returns a :class:`Run`, everything the loop (:mod:`selfsup.train.loop`) needs and nothing
it has to look up again: the loop's per-step state (``step``, skipped-step counters) lives on it too, so a
checkpoint is written from one object.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from selfsup import distributed as dist
from selfsup.config import RunConfig, compile_mode
from selfsup.data import DataError, ImageSet, holdout_split, load_dataset
from selfsup.data.clips import ClipSet
from selfsup.data.load import resident
from selfsup.methods import get_method
from selfsup.methods.base import MethodSpec, Progress
from selfsup.monitor.collapse import CollapseMonitor
from selfsup.monitor.features import extract_features
from selfsup.monitor.knn import knn_accuracy
from selfsup.schedules import CONTINUATION_RULE, Horizon, scaled_lr
from selfsup.train.batches import resident_images
from selfsup.train.build import (build_method, check_batch, check_inputs, check_names, check_run, resolve_config,
                                 view_recipe)
from selfsup.train.checkpoint import FORMAT_VERSION, atomic_save, check_compatible, safe_load
from selfsup.train.device import (choose_attention, resolve_device, resolve_precision, rng_state, set_rng_state,
                                  sync_batchnorm)
from selfsup.train.optim import build_optimizer
from selfsup.train.rundir import MetricsLog, check_resumable, write_env
from selfsup.train.trackers import TRACKING_FILE, Trackers, check_trackers, open_trackers
from selfsup.train.startup import StartupClock
from selfsup.views import ViewRecipe
from selfsup.views.clips import ClipRecipe

log = logging.getLogger("selfsup")
KNN_BANK_SIZE = 10000


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must see (diverging loss, collapse stop)."""


@dataclass
class Data:
    """The pretraining images, the held-out split and bank of the online kNN monitor, and the normalisation."""

    train: ImageSet | ClipSet
    val: ImageSet | ClipSet
    bank: ImageSet | ClipSet
    mean: list[float]
    std: list[float]


def prepare_data(cfg: RunConfig, clock: StartupClock | None = None) -> Data:
    clock = clock or StartupClock()
    with clock.part("data"):
        # the test split is not needed here; an image folder is split while on disk, then only the training
        # and held-out images are loaded into RAM (when they are: data.stream, data.memory_budget_gb)
        train_full, _ = load_dataset(cfg.data, place=False)
        if len(train_full) < 2:
            raise DataError(f"{cfg.data.name}: only {len(train_full)} training image(s); need at least 2")
        train_idx, val_idx = holdout_split(len(train_full), cfg.data.val_size, cfg.train.seed)
        train, val = resident(train_full.subset(train_idx), train_full.subset(val_idx), cfg.data)
        del train_full
    with clock.part("mean_std"):
        mean, std = train.mean_std()
    return Data(train, val, train.head(KNN_BANK_SIZE), mean, std)


def with_eval_clip(data: Data, recipe: ViewRecipe | ClipRecipe) -> Data:
    """Clip data whose online kNN monitor sees the run's training clip (T frames, stride) centred in each record."""
    if not isinstance(recipe, ClipRecipe):
        return data
    clip = {"clip_len": recipe.clip_len, "stride": recipe.stride}
    return dataclasses.replace(data, val=data.val.with_eval(**clip), bank=data.bank.with_eval(**clip))


class _Stepper(nn.Module):
    """Routes DDP's forward to ``training_step`` so gradient synchronisation follows the method's loss; or, with
    ``part``, to ``part(method, views, progress, **extra)``: one chunk of a micro-batched step
    (:mod:`selfsup.train.micro`), run here so that DDP prepares for the backward that follows it."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, views: list[Tensor], progress: Progress, part: Callable[..., Any] | None = None,
                **extra: Tensor):
        if part is not None:
            return part(self.method, views, progress, **extra)
        return self.method.training_step(views, progress, **extra)


@dataclass
class Run:
    """A run being trained: its settings, parts, and the loop's position (``step``, skipped steps)."""

    cfg: RunConfig
    run_dir: Path
    device: torch.device
    data: Data
    resident: Tensor | None
    """The training records held on the GPU for the whole run (small in-memory sets on CUDA), else None."""
    recipe: ViewRecipe | ClipRecipe
    model: nn.Module
    spec: MethodSpec
    stepper: nn.Module
    optimizer: torch.optim.Optimizer
    amp_dtype: torch.dtype | None
    channels_last: bool
    steps_per_epoch: int
    total_steps: int
    base_lr: float
    metrics: MetricsLog
    collapse: CollapseMonitor
    horizon: Horizon
    """The steps the schedules span; grown when a finished run is continued for more epochs."""
    trainable: list[Tensor] = field(default_factory=list)
    trackers: Trackers | None = None
    """Rank 0's experiment trackers (``train.loggers``), fed by ``metrics``; None without any."""
    compile_s: float | None = None
    """With ``train.compile``: seconds of the first step in this process, compilation included (None until then)."""
    step: int = 0
    bad_total: int = 0
    bad_in_row: int = 0
    world: int = 1
    rank: int = 0
    startup: StartupClock = field(default_factory=StartupClock)
    """When this process started and how long its set-up took; the loop records its first step."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"


def setup_run(cfg: RunConfig, run_dir: Path, overwrite: bool = False) -> Run:
    """Everything a run needs, built once: the resolved config, data, model, optimiser, and a resumed state
    when ``run_dir`` holds a checkpoint (refused when its config differs). ``overwrite`` deletes what
    ``run_dir`` holds only once the data, the model and the optimiser are built: a run that cannot start
    (a bad name, size or folder) leaves a finished run's checkpoints where they were."""
    clock = StartupClock()
    world, rank = dist.world_size(), dist.rank()
    t = cfg.train
    device = resolve_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    if rank == 0 and device.type == "cpu":
        warn_if_oversubscribed()
    torch.manual_seed(t.seed + rank)
    check_names(cfg)
    check_trackers(cfg, run_dir)
    data = prepare_data(cfg, clock)
    cfg = resolve_config(cfg, data.train)
    resuming = not overwrite and (run_dir / "checkpoints" / "last.pt").is_file()
    saved_epochs = check_resumable(run_dir, cfg) if resuming else t.epochs
    spec = get_method(cfg.method.name).spec
    check_inputs(cfg, spec, data.train.kind)
    check_batch(cfg, spec, len(data.train), world)
    recipe = view_recipe(cfg, spec, data.train.image_size, getattr(data.train, "frames", None))
    data = with_eval_clip(data, recipe)
    with clock.part("model"):
        model, channels_last = _build_model(cfg, data, world, device, recipe, weights=not resuming)
    steps_per_epoch = len(data.train) // t.batch_size
    total_steps = steps_per_epoch * t.epochs
    _describe(cfg, data, spec, steps_per_epoch, total_steps)
    base_lr = scaled_lr(cfg.optim.lr, t.batch_size, cfg.optim.lr_scaling)
    stepper: nn.Module = _Stepper(model)
    if world > 1:
        stepper = torch.nn.parallel.DistributedDataParallel(stepper, device_ids=[device] if device.type == "cuda" else None)
    if compile_mode(t.compile) == "on":  # the whole training step; the model's state-dict keys are unchanged
        stepper = torch.compile(stepper)
    amp_dtype = resolve_precision(t.precision, device)
    choose_attention(model, device, amp_dtype)
    run = Run(cfg=cfg, run_dir=run_dir, device=device, data=data, resident=resident_images(data.train, device),
              recipe=recipe, model=model, spec=spec, stepper=stepper, optimizer=build_optimizer(model, cfg.optim, base_lr),
              amp_dtype=amp_dtype, channels_last=channels_last,
              steps_per_epoch=steps_per_epoch, total_steps=total_steps,
              base_lr=base_lr,
              metrics=MetricsLog(run_dir / "metrics.jsonl", enabled=rank == 0),
              collapse=CollapseMonitor(verbose=rank == 0, stops=t.stop_on_collapse), horizon=Horizon(total_steps),
              trainable=[p for p in model.parameters() if p.requires_grad], world=world, rank=rank, startup=clock)
    continued_from = _resume(run, saved_epochs) if resuming else None
    if not resuming:
        if overwrite and run.main and run_dir.exists():
            shutil.rmtree(run_dir)
        _start_run_dir(run)
    if run.main:
        _write_run_files(run)
        if t.loggers:
            with clock.part("trackers"):
                run.trackers = run.metrics.trackers = open_trackers(cfg, run_dir, run.step, resuming)
    if continued_from is not None:
        _record_continuation(run, continued_from)
    clock.setup_done()
    return run


def warn_if_oversubscribed() -> bool:
    """Warn (and return True) when more runnable work than cores is already on the machine while torch uses several
    threads: every parallel kernel then waits at its barriers for a descheduled thread, and OpenMP's spin-waiting
    makes each step many times slower (measured 10× for the default recipe on 2 busy cores,
    ``benchmarks/step/README.md``), where one thread, or passive waiting, loses little."""
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return False
    if threads < 2 or load < cores + 1 or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        return False
    log.warning("the machine is busy (load average %.1f on %d cores) and torch uses %d threads: parallel kernels "
                "wait for descheduled threads, which can make training many times slower. Use --threads 1, or start "
                "with OMP_WAIT_POLICY=PASSIVE in the environment.", load, cores, threads)
    return True


def _describe(cfg: RunConfig, data: Data, spec: MethodSpec, steps_per_epoch: int, total_steps: int) -> None:
    """What the run will do, said before it starts; and a warning when it is too short to learn anything."""
    if dist.rank() != 0:
        return
    t = cfg.train
    log.info("%s on %s at %d px: backbone %s, %d epoch(s) × %d steps = %d steps of batch %d, %s lr %g (×B/256: %s)",
             cfg.method.name, data.train.describe(), data.train.image_size, cfg.backbone.name, t.epochs,
             steps_per_epoch, total_steps, t.batch_size, cfg.optim.name, cfg.optim.lr, cfg.optim.lr_scaling)
    if total_steps < spec.min_steps:
        need = -(-spec.min_steps // max(steps_per_epoch, 1))
        log.warning("only %d optimisation steps: %s is unlikely to learn anything beyond a random encoder in fewer "
                    "than ~%d (MethodSpec.min_steps). Train for ≥ %d epochs at this batch size, or use a smaller "
                    "--batch-size or more images.", total_steps, cfg.method.name, spec.min_steps, need)


def _build_model(cfg: RunConfig, data: Data, world: int, device: torch.device,
                 recipe: ViewRecipe | ClipRecipe, weights: bool = True) -> tuple[nn.Module, bool]:
    """The method on the device, checked against the data and views, channels-last where it pays, and with
    ``train.compile: backbone`` its backbone compiled in place (state-dict keys unchanged). ``weights``: initialise
    the backbone from ``backbone.weights`` (a new run; a resumed one takes its checkpoint and needs no file)."""
    model = build_method(cfg, data.train.channels, data.train.image_size, world, weights=weights,
                         stats=(data.mean, data.std)).to(device)
    if world > 1:
        model = sync_batchnorm(model, device, dist.rank() == 0)
    check_run(model, cfg, len(data.train), recipe)
    t = cfg.train
    # clips are 5-D: channels_last is for 4-D tensors; channels_last_3d measured 1.11-1.27x faster for the 3D CNNs
    # (benchmarks/video/channels_last_3d.md) but not yet switched on (per-frame backbones run 4-D convolutions)
    images = data.train.kind == "images"
    channels_last = images and (t.channels_last == "on" or (t.channels_last == "auto" and data.train.image_size >= 8))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_mode(t.compile) == "backbone":
        model.backbone.compile()
    return model, channels_last


def _resume(run: Run, saved_epochs: int) -> int | None:
    """The checkpoint's state in ``run``; when the config asks for more epochs than the run had, its horizon is
    continued (returns the epochs it had, else None)."""
    ckpt = safe_load(run.ckpt_path, map_location=run.device)
    check_compatible(ckpt, run.cfg.method.name, run.cfg.backbone.name)
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.step, run.bad_total = int(ckpt["step"]), int(ckpt.get("bad_steps", 0))
    set_rng_state(ckpt["rng"], run.device)
    if "collapse_monitor" in ckpt:  # checkpoints written before it was saved: the monitor starts afresh
        run.collapse.load_state_dict(ckpt["collapse_monitor"])  # rank 0's, on every process of a distributed run
    run.metrics.truncate_after(run.step)
    horizon = Horizon.from_state(ckpt.get("horizon"), run.steps_per_epoch * saved_epochs)
    if run.cfg.train.epochs > saved_epochs and run.total_steps > horizon.total_steps:
        run.horizon = horizon.continued(run.step, run.total_steps, _blend_steps(run))
        return saved_epochs
    run.horizon = horizon
    if horizon.total_steps != run.total_steps:  # as before horizons were saved: the schedules follow the data
        run.horizon = Horizon(run.total_steps)
        if run.main:
            log.warning("%s: the run now has %d steps per epoch (%d steps in all, not %d): its data changed; the "
                        "schedules follow the new total", run.run_dir, run.steps_per_epoch, run.total_steps,
                        horizon.total_steps)
    if run.main:
        log.info("resuming %s from step %d (epoch %d)", run.run_dir, run.step, run.step // run.steps_per_epoch + 1)
    return None


def _blend_steps(run: Run) -> int:
    """How many steps a continued run's schedules take to join the longer ones (:class:`Horizon`): the run's
    warm-up, at least an epoch, at most half of the steps added."""
    warmup = int(run.cfg.optim.warmup_epochs * run.steps_per_epoch)
    return min(max(warmup, run.steps_per_epoch), (run.total_steps - run.step) // 2)


def _record_continuation(run: Run, saved_epochs: int) -> None:
    """A run continued for more epochs: said in a line, recorded in ``metrics.jsonl`` (and ``env.json``, by
    :func:`_write_run_files`), and made durable at once — ``config.yaml`` gets the new epochs and the checkpoint
    the new horizon, so an interruption now resumes this continuation instead of deciding it again."""
    c = run.horizon.continuations[-1]
    if run.main:
        log.info("continuing %s for more epochs: %d → %d epochs from step %d (epoch %d); every schedule is "
                 "extended to %d steps, joined over %d steps from the values reached", run.run_dir, saved_epochs,
                 run.cfg.train.epochs, c.step, c.step // run.steps_per_epoch, c.to_steps, c.blend_steps)
        (run.run_dir / "config.yaml").write_text(run.cfg.to_yaml())
        run.metrics.write({"step": c.step, "epoch": c.step // run.steps_per_epoch,
                           "continued": _continuations(run)[-1]})
    save_checkpoint(run, epoch_done=False)  # every rank: it gathers the RNG states


def _continuations(run: Run) -> list[dict]:
    """Each continuation of the run in its epochs and steps, with the rule, as ``env.json`` and ``metrics.jsonl``
    record it."""
    spe = run.steps_per_epoch
    return [{"from_epochs": c.from_steps // spe, "to_epochs": c.to_steps // spe, "from_step": c.step,
             "from_total_steps": c.from_steps, "to_total_steps": c.to_steps, "blend_steps": c.blend_steps,
             "rule": CONTINUATION_RULE} for c in run.horizon.continuations]


def _start_run_dir(run: Run) -> None:
    if run.main:
        (run.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run.run_dir / "config.yaml").write_text(run.cfg.to_yaml())
        (run.run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a run killed before its first checkpoint
        (run.run_dir / TRACKING_FILE).unlink(missing_ok=True)  # its trackers' runs are not continued
        shutil.rmtree(run.run_dir / "tensorboard", ignore_errors=True)


def _write_run_files(run: Run) -> None:
    """``env.json`` (versions, device, what was trained on) and ``encoder.json`` (how to rebuild the encoder)."""
    for stale in (run.run_dir / "checkpoints").glob(".*.tmp"):  # writes a kill interrupted; never loaded
        stale.unlink(missing_ok=True)
    train, cfg = run.data.train, run.cfg
    write_env(run.run_dir, run.device, cfg.train.seed, run.world, {
        "precision": str(run.amp_dtype or "fp32"), "channels_last": run.channels_last,
        "compile": compile_mode(cfg.train.compile), "resumed_from_step": run.step,
        **({"continued": _continuations(run)} if run.horizon.continuations else {}),
        "pretraining_images": len(train), "pretraining_class_counts": train.class_counts()})
    (run.run_dir / "encoder.json").write_text(json.dumps({
        "backbone": cfg.backbone.name, "params": cfg.backbone.params, "in_chans": train.channels,
        "image_size": train.image_size, "num_features": run.model.backbone.num_features,
        "mean": run.data.mean, "std": run.data.std, "method": cfg.method.name, **_clip_meta(run)}, indent=2))


def _clip_meta(run: Run) -> dict:
    """What ``encoder.json`` records of a clip encoder: the input it was trained on (``clip``: T, stride, and the
    records' frames), which evaluation uses as its view."""
    if not isinstance(run.recipe, ClipRecipe):
        return {}
    return {"inputs": "clips", "clip": {"clip_len": run.recipe.clip_len, "stride": run.recipe.stride,
                                        "record_frames": run.data.train.frames}}


def record_compile_time(run: Run, seconds: float) -> None:
    """With ``train.compile``: the first step's time (compilation included), logged and added to ``env.json``."""
    run.compile_s = seconds
    if not run.main:
        return
    log.info("torch.compile (%s): the first step took %.1fs, compilation included", compile_mode(run.cfg.train.compile),
             seconds)
    path = run.run_dir / "env.json"
    env = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**env, "compile_s": round(seconds, 2)}, indent=2))


def save_checkpoint(run: Run, epoch_done: bool) -> None:
    """``checkpoints/last.pt`` (and ``epoch_N.pt`` every ``checkpoint_every`` epochs), written atomically."""
    rng = rng_state(run.device)  # a collective: every rank takes part
    if not run.main:
        return
    cfg = run.cfg
    state = {"meta": {"format": FORMAT_VERSION, "method": cfg.method.name, "backbone": cfg.backbone.name},
             "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "step": run.step,
             "bad_steps": run.bad_total, "collapse_monitor": run.collapse.state_dict(), "rng": rng,
             "config": cfg.to_dict(), "horizon": run.horizon.state_dict()}
    t0 = time.perf_counter()
    atomic_save(state, run.ckpt_path)
    epoch = run.step // run.steps_per_epoch
    if epoch_done and cfg.train.checkpoint_every and epoch % cfg.train.checkpoint_every == 0:
        atomic_save(state, run.run_dir / "checkpoints" / f"epoch_{epoch}.pt")
    log.debug("checkpoint at step %d written in %.2fs", run.step, time.perf_counter() - t0)


def record_startup(run: Run) -> None:
    """After this process's first optimiser step: how long it took to get there (``env.json``'s ``startup``,
    :mod:`selfsup.train.startup`), said in one line."""
    figures = run.startup.first_step()
    if not run.main:
        return
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in figures["parts_s"].items())
    log.info("first step %.1f s after the %s (%s s; %.1f s of CPU time)", figures["first_step_s"], figures["from"],
             parts, figures["first_step_cpu_s"])
    path = run.run_dir / "env.json"
    try:
        env = json.loads(path.read_text())
        env["startup"] = figures
        path.write_text(json.dumps(env, indent=2))
    except (OSError, ValueError):
        log.debug("could not record the start-up time in %s", path)


def knn_monitor(run: Run) -> float | None:
    """Online kNN accuracy on the held-out split, with (part of) the training set as the bank."""
    data = run.data
    if data.val.labels is None or len(data.val) == 0 or data.bank.labels is None:
        return None
    bank = extract_features(run.model, data.bank, data.mean, data.std, run.device, channels_last=run.channels_last)
    queries = extract_features(run.model, data.val, data.mean, data.std, run.device, channels_last=run.channels_last)
    return knn_accuracy(bank, data.bank.labels, queries, data.val.labels, data.train.num_classes)
