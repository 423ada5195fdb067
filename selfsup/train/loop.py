"""The one training loop: views on the device, the method's step, the optimiser, checkpoints, monitors.

``pretrain(cfg, run_dir)`` is what ``selfsup pretrain`` runs. It is explicit on purpose (as DINO's
``train_one_epoch``): every per-iteration schedule is computed here from :class:`Progress`, and a
method only wires its heads and losses.
"""
from __future__ import annotations

import json
import logging
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.config import ConfigError, RunConfig
from selfsup.data import DataError, ImageSet, holdout_split, load_dataset
from selfsup.monitor.collapse import CollapseMonitor
from selfsup.monitor.diagnostics import batch_diagnostics
from selfsup.monitor.features import extract_features
from selfsup.monitor.knn import knn_accuracy
from selfsup.methods import get_method
from selfsup.methods.base import Progress
from selfsup import distributed as dist
from selfsup.train.build import build_method, check_batch, check_names, check_run, view_recipe
from selfsup.train.checkpoint import FORMAT_VERSION, atomic_save, check_compatible, safe_load
from selfsup.train.optim import build_optimizer, set_lr
from selfsup.train.rundir import MetricsLog, check_resumable, write_env
from selfsup.train.schedules import scaled_lr, warmup_cosine
from selfsup.views import make_views

log = logging.getLogger("selfsup")
KNN_BANK_SIZE = 10000


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must see (diverging loss, collapse stop)."""


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present. Under torchrun each process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.is_distributed():
        name = f"cuda:{dist.local_rank()}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError([f"train.device is {name!r} but no CUDA GPU is available; use --device cpu"])
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), read from /proc/cpuinfo (Linux).

    Elsewhere (other systems, CPUs that would emulate bf16) the answer is False, and fp32 is kept."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast dtype or None. ``auto`` uses bf16 where it is native: GPUs that support it, and
    CPUs with AVX-512 BF16/AMX (the small CNN's step is 1.6× faster there, benchmarks/bench_step.py);
    on other CPUs bf16 is emulated and slower than fp32, so ``auto`` keeps fp32."""
    if name == "bf16":
        return torch.bfloat16
    if name != "auto":
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


class _Stepper(nn.Module):
    """Routes DDP's forward to ``training_step`` so gradient synchronisation follows the method's loss."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, views: list[Tensor], progress: Progress, **extra: Tensor):
        return self.method.training_step(views, progress, **extra)


@dataclass
class Data:
    train: ImageSet
    val: ImageSet
    bank: ImageSet
    mean: list[float]
    std: list[float]


def prepare_data(cfg: RunConfig) -> Data:
    train_full, _ = load_dataset(cfg.data)
    if len(train_full) < 2:
        raise DataError(f"{cfg.data.name}: only {len(train_full)} training image(s); need at least 2")
    train_idx, val_idx = holdout_split(len(train_full), cfg.data.val_size, cfg.train.seed)
    train = train_full.subset(train_idx)
    val = train_full.subset(val_idx)
    bank = train.head(KNN_BANK_SIZE)
    mean, std = train.mean_std()
    return Data(train, val, bank, mean, std)


def knn_monitor(model: nn.Module, data: Data, device: torch.device, channels_last: bool) -> float | None:
    """Online kNN accuracy on the held-out split, with (part of) the training set as the bank."""
    if data.val.labels is None or len(data.val) == 0 or data.bank.labels is None:
        return None
    bank = extract_features(model, data.bank, data.mean, data.std, device, channels_last=channels_last)
    queries = extract_features(model, data.val, data.mean, data.std, device, channels_last=channels_last)
    return knn_accuracy(bank, data.bank.labels, queries, data.val.labels, data.train.num_classes)


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


def _sync_batchnorm(model: nn.Module, device: torch.device, main: bool) -> nn.Module:
    """Batch statistics over the global batch (SimCLR §B.9 "global BN"): SyncBatchNorm on GPUs. torch has
    no SyncBatchNorm for CPU tensors, so CPU processes keep per-process statistics, with a warning."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if main:
        log.warning("SyncBatchNorm needs GPUs: on CPU each process normalises with its own batch statistics "
                    "(the method's loss still uses the global batch)")
    return model


def _rng_state(device: torch.device) -> list[dict[str, Tensor]]:
    """Every rank's RNG state (augmentations draw from it), so each rank resumes its own stream."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).cpu()
    if dist.world_size() == 1:
        return [state]
    states: list = [None] * dist.world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def _set_rng_state(states: list[dict[str, Tensor]], device: torch.device) -> None:
    if len(states) != dist.world_size():
        log.warning("checkpoint holds RNG states of %d process(es), this run has %d: augmentation draws differ "
                    "from the uninterrupted run", len(states), dist.world_size())
    state = states[dist.rank() % len(states)]
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The data order of one epoch depends only on (seed, epoch), so a resumed run replays it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def _grads_finite(params: list[Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack(norms)).all())


def _scalar_logs(logs: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items() if not isinstance(v, Tensor) or v.numel() == 1}


def pretrain(cfg: RunConfig, run_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Pretrain ``cfg`` into ``run_dir``, resuming from ``checkpoints/last.pt`` when it exists.

    Returns the last epoch's summary (loss, images/s, kNN accuracy, diagnostics).
    """
    run_dir = Path(run_dir)
    t = cfg.train
    check_names(cfg)
    method_cls = get_method(cfg.method.name).cls
    world, rank = dist.world_size(), dist.rank()
    main = rank == 0
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    if overwrite and main and run_dir.exists():
        shutil.rmtree(run_dir)
    resuming = ckpt_path.is_file()
    if resuming:
        check_resumable(run_dir, cfg)

    device = resolve_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed + rank)
    data = prepare_data(cfg)
    check_batch(cfg, method_cls, len(data.train), world)
    recipe = view_recipe(cfg, method_cls, data.train.image_size)
    model = build_method(cfg, data.train.channels, data.train.image_size, world).to(device)
    if world > 1:
        model = _sync_batchnorm(model, device, main)
    check_run(model, cfg, len(data.train), recipe)
    amp_dtype = resolve_precision(t.precision, device)
    channels_last = t.channels_last == "on" or (t.channels_last == "auto" and data.train.image_size >= 8)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    batch = t.batch_size // world
    steps_per_epoch = len(data.train) // t.batch_size
    total_steps = steps_per_epoch * t.epochs
    warmup_steps = min(int(cfg.optim.warmup_epochs * steps_per_epoch), total_steps - 1)
    base_lr = scaled_lr(cfg.optim.lr, t.batch_size, cfg.optim.lr_scaling)
    optimizer = build_optimizer(model, cfg.optim, base_lr)
    trainable = [p for p in model.parameters() if p.requires_grad]

    start_step, bad_total = 0, 0
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=main)
    if resuming:
        ckpt = safe_load(ckpt_path, map_location=device)
        check_compatible(ckpt, cfg.method.name, cfg.backbone.name)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step, bad_total = int(ckpt["step"]), int(ckpt.get("bad_steps", 0))
        _set_rng_state(ckpt["rng"], device)
        metrics.truncate_after(start_step)
        if main:
            log.info("resuming %s from step %d (epoch %d)", run_dir, start_step, start_step // steps_per_epoch + 1)
    elif main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a run killed before its first checkpoint
    if main:
        for stale in (run_dir / "checkpoints").glob(".*.tmp"):  # writes a kill interrupted; never loaded
            stale.unlink(missing_ok=True)
    if main:
        log.info("pretraining on %s", data.train.describe())
        write_env(run_dir, device, t.seed, world, {"precision": str(amp_dtype or "fp32"),
                                                   "channels_last": channels_last, "resumed_from_step": start_step,
                                                   "pretraining_images": len(data.train),
                                                   "pretraining_class_counts": data.train.class_counts()})
        (run_dir / "encoder.json").write_text(json.dumps({
            "backbone": cfg.backbone.name, "params": cfg.backbone.params, "in_chans": data.train.channels,
            "image_size": data.train.image_size, "num_features": model.backbone.num_features,
            "mean": data.mean, "std": data.std, "method": cfg.method.name}, indent=2))

    stepper: nn.Module = _Stepper(model)
    if world > 1:
        stepper = torch.nn.parallel.DistributedDataParallel(stepper, device_ids=[device] if device.type == "cuda" else None)

    def save(step: int, epoch_done: bool) -> None:
        rng = _rng_state(device)  # a collective: every rank takes part
        if not main:
            return
        state = {"meta": {"format": FORMAT_VERSION, "method": cfg.method.name, "backbone": cfg.backbone.name},
                 "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "bad_steps": bad_total, "rng": rng, "config": cfg.to_dict()}
        atomic_save(state, ckpt_path)
        epoch = step // steps_per_epoch
        if epoch_done and t.checkpoint_every and epoch % t.checkpoint_every == 0:
            atomic_save(state, run_dir / "checkpoints" / f"epoch_{epoch}.pt")

    train_images = data.train.images
    if device.type == "cuda":
        train_images = train_images.pin_memory() if train_images.numel() > 2**31 else train_images.to(device)

    summary: dict[str, Any] = {}
    bad_in_row = 0
    collapse = CollapseMonitor(verbose=main, stops=t.stop_on_collapse)
    step = start_step
    with _StopFlag() as stop:
        for epoch in range(start_step // steps_per_epoch, t.epochs):
            order = _epoch_order(len(data.train), t.seed, epoch)
            first = step - epoch * steps_per_epoch
            bar = _progress_bar(t.progress and main, steps_per_epoch, first, epoch, t.epochs)
            model.train()
            epoch_t0, timed_images, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0
            window_t0, window_images = time.perf_counter(), 0
            for i in range(first, steps_per_epoch):
                idx = order[i * t.batch_size + rank * batch : i * t.batch_size + (rank + 1) * batch]
                x = train_images[idx.to(train_images.device)].to(device, non_blocking=True)
                progress = Progress(step, total_steps, epoch, steps_per_epoch)
                lr = warmup_cosine(step, total_steps, warmup_steps, base_lr, base_lr * cfg.optim.min_lr_ratio)
                set_lr(optimizer, lr, base_lr)
                with torch.no_grad():
                    views = make_views(x, recipe, data.mean, data.std)
                if channels_last:
                    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                    # a method with ``needs_indices`` (a per-sample memory, DeepCluster-v2) also gets the batch's
                    # positions in the training set
                    extra = {"indices": idx} if getattr(model, "needs_indices", False) else {}
                    loss, logs = stepper(views, progress, **extra)
                loss = loss.float()
                optimizer.zero_grad(set_to_none=True)
                finite = bool(torch.isfinite(loss))
                if finite:
                    loss.backward()
                    if cfg.optim.clip_grad:
                        finite = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.clip_grad)))
                    else:
                        finite = _grads_finite(trainable)
                if not finite:
                    bad_in_row, bad_total = bad_in_row + 1, bad_total + 1
                    optimizer.zero_grad(set_to_none=True)
                    terms = _scalar_logs(logs)
                    log.warning("step %d: non-finite loss or gradient (loss %s, lr %.4g, terms %s); step skipped",
                                step, float(loss.detach()), lr, terms)
                    metrics.write({"step": step, "epoch": epoch + 1, "skipped": True, "loss": float(loss.detach()), "lr": lr})
                    if bad_in_row >= t.max_bad_steps:
                        raise TrainingError(
                            f"stopped at step {step}: {bad_in_row} consecutive steps with a NaN/Inf loss or gradient "
                            f"(last loss {float(loss.detach())}, terms {terms}, lr {lr:.4g}). The last good checkpoint, "
                            f"{ckpt_path}, is intact; lower the learning rate or enable optim.clip_grad.")
                    continue
                bad_in_row = 0
                optimizer.step()
                if hasattr(model, "after_step"):
                    model.after_step(progress)
                step += 1
                timed_images += t.batch_size
                window_images += t.batch_size
                loss_value = None
                if step % t.log_every == 0 or i == steps_per_epoch - 1:
                    loss_value = float(loss.detach())
                    loss_sum, loss_n = loss_sum + loss_value, loss_n + 1
                    now = time.perf_counter()
                    ips = window_images / max(now - window_t0, 1e-9)
                    window_t0, window_images = now, 0
                    record = {"step": step, "epoch": epoch + 1, "loss": loss_value, "lr": lr, "images_per_s": ips,
                              **{k: v for k, v in _scalar_logs(logs).items()}}
                    if "z" in logs:
                        record.update(batch_diagnostics(logs["z"], logs.get("z_pair")))
                        record.update(collapse.update(step, record, logs["z"]))  # {"collapse_warning": …} when it fires
                    metrics.write(record)
                    if t.stop_on_collapse and collapse.should_stop():
                        raise TrainingError(f"stopped at step {step}: {collapse.stop_message()}. Checkpoints of finished "
                                            f"epochs are kept in {ckpt_path.parent}; fix the recipe (see the warning).")
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{ips:.0f}")
                if bar is not None:
                    bar.update(1)
                if t.checkpoint_steps and step % t.checkpoint_steps == 0 and i < steps_per_epoch - 1:
                    save(step, epoch_done=False)
                if stop.requested(device):
                    save(step, epoch_done=False)
                    if bar is not None:
                        bar.close()
                    log.warning("SIGTERM: saved %s at step %d; run the same command to resume", ckpt_path, step)
                    raise SystemExit(143)
            if bar is not None:
                bar.close()
            train_time = time.perf_counter() - epoch_t0
            knn = knn_monitor(model, data, device, channels_last) if t.knn_every and (epoch + 1) % t.knn_every == 0 else None
            summary = {"step": step, "epoch": epoch + 1, "loss": loss_sum / max(loss_n, 1),
                       "images_per_s": timed_images / max(train_time, 1e-9), "knn": knn, "epoch_time_s": train_time,
                       "skipped_steps": bad_total}
            if "z" in logs:
                summary.update(batch_diagnostics(logs["z"], logs.get("z_pair")))
            metrics.write(summary)
            save(step, epoch_done=True)
            if main:
                _print_summary(summary, t.epochs)
    if main:
        atomic_save(model.backbone.state_dict(), run_dir / "encoder.pt")
    return summary


def _progress_bar(enabled: bool, total: int, initial: int, epoch: int, epochs: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", leave=False, file=sys.stderr,
                dynamic_ncols=True, unit="step")


def _print_summary(s: dict[str, Any], epochs: int) -> None:
    knn = "n/a" if s["knn"] is None else f"{100 * s['knn']:.2f}%"
    rank = f"  rank {s['rank']:.1f}" if "rank" in s else ""
    spread = f"  spread {s['spread']:.3f} (healthy {s['spread_healthy']:.3f})" if "spread" in s else ""
    print(f"epoch {s['epoch']}/{epochs}  loss {s['loss']:.4f}  {s['images_per_s']:.0f} img/s  "
          f"knn {knn}{spread}{rank}  {s['epoch_time_s']:.1f}s", flush=True)
