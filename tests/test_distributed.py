"""Distributed parity: two gloo processes with batch B each equal one process with batch 2B.

Methods that draw randomness inside ``training_step`` (``stochastic_step = True``: masks) are left out here,
since one process with 2B samples and two with B draw different masks; their losses are covered at the
loss level. The bug class this guards against: gradients off by the world size, or negatives/statistics taken
from the local batch only. For every registered method whose constructor takes ``gather``, both
processes start from identical weights, each takes its half of the same views, and the loss is
averaged and the gradients all-reduce-averaged over processes exactly as DDP does. They must match
the single-process loss and gradients on the combined batch. BatchNorm runs in eval mode here (CPU
has no SyncBatchNorm), so every cross-sample interaction left is the method's loss.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selfsup.methods import METHODS
from selfsup.methods.base import make_progress
from selfsup.methods.registry import method_params
from spawned import gloo_group

WORLD = 2
# tiny_method lives in tests/methods/test_methods.py, importable only once that folder is on the path
# (pytest adds it when it collects a test there, not when this file runs alone or on another xdist worker).
sys.path.insert(0, str(Path(__file__).resolve().parent / "methods"))
GATHER_METHODS = sorted(n for n, info in METHODS.items()
                        if "gather" in method_params(info.cls) and not info.spec.stochastic_step)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(name: str, gather: bool):
    from test_methods import tiny_method  # the same tiny settings as the registry tests

    torch.manual_seed(0)
    method = tiny_method(name, METHODS[name].spec.test_in_chans)
    method.gather = gather
    return method.eval()


def _views(name: str, n: int):
    """The views of n random images (clip records of them for a clip method) and the extra ``training_step``
    arguments (``boxes=``), made as the registry tests make them."""
    from test_methods import IMAGE_SIZE, fixed_views

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, METHODS[name].spec.test_in_chans, IMAGE_SIZE, IMAGE_SIZE), generator=g,
                           dtype=torch.uint8)
    return fixed_views(_build(name, False), images)


def _step(method, views, extra):
    torch.manual_seed(3)
    loss, _ = method.training_step(views, make_progress(method, 5, 100, 0, 10), **extra)
    method.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _worker(rank: int, name: str, port: int, out_dir: str, b: int) -> None:
    with gloo_group(rank, WORLD, port):
        views, extra = _views(name, WORLD * b)
        half = slice(rank * b, (rank + 1) * b)
        views = [v[half] for v in views]
        extra = {k: [t[half] for t in ts] for k, ts in extra.items()}  # boxes: one tensor per view
        loss, grads = _step(_build(name, gather=True), views, extra)
        dist.all_reduce(loss)
        for g in grads.values():  # DDP: average the gradients over processes
            dist.all_reduce(g)
            g /= WORLD
        if rank == 0:
            torch.save({"loss": loss / WORLD, "grads": grads}, os.path.join(out_dir, "dist.pt"))


@pytest.mark.parametrize("name", GATHER_METHODS)
def test_two_processes_match_one(name):
    b = 8
    single_loss, single_grads = _step(_build(name, gather=False), *_views(name, WORLD * b))
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(name, _free_port(), out, b), nprocs=WORLD, join=True)
        got = torch.load(os.path.join(out, "dist.pt"), weights_only=True)
    torch.testing.assert_close(got["loss"], single_loss, rtol=1e-5, atol=1e-6)
    assert got["grads"].keys() == single_grads.keys()
    # Gradients that are zero in exact arithmetic (a bias right before batch standardisation) come out as float32
    # rounding noise whose size follows the largest gradients of the model: the tolerance scales with them.
    scale = max(float(g.abs().max()) for g in single_grads.values())
    for key, g in single_grads.items():
        torch.testing.assert_close(got["grads"][key], g, rtol=1e-4, atol=1e-6 + 1e-5 * scale,
                                   msg=f"{name}: gradient of {key}")


def test_leave_worker_flushes_output_and_exits_zero():
    """A torchrun worker that finished leaves with os._exit(0): buffered stdout and logging still come out."""
    code = ("import logging, sys; from selfsup.distributed import leave_worker; logging.basicConfig(); "
            "print('written', end=''); logging.getLogger('x').warning('logged'); leave_worker(); sys.exit(3)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "written") and "logged" in done.stderr


def test_gather_is_identity_on_one_process():
    from selfsup.distributed import all_reduce_mean, gather, gather_no_grad

    x = torch.randn(3, 4, requires_grad=True)
    assert gather(x) is x and gather_no_grad(x) is x
    torch.testing.assert_close(all_reduce_mean(x), x)


def _torchrun(out, *extra: str) -> "subprocess.CompletedProcess[str]":
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "selfsup", "pretrain", "--method", "simclr", "--data", "digits", "--limit", "512", "--epochs", "2",
           "--threads", "1", "--device", "cpu", "--no-progress", "--out", str(out),
           "--set", "backbone.params.widths=[8,16]", "--set", "train.log_every=2", *extra]
    # PYTHONFAULTHANDLER: a process that dies of a signal prints its Python stack into the captured stderr.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _died_of_signal(done: "subprocess.CompletedProcess[str]") -> bool:
    """torchrun's report names a negative exit code when a process was killed by a signal (e.g. SIGABRT)."""
    return done.returncode != 0 and re.search(r"exitcode\s*:\s*-\d+", done.stderr) is not None


def _children_output(stderr: str, head: int = 6000, tail: int = 2000) -> str:
    """The processes' own messages come first, torchrun's summary last: show both ends of a long stderr."""
    return stderr if len(stderr) <= head + tail else f"{stderr[:head]}\n[… cut …]\n{stderr[-tail:]}"


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_and_write_one_run(tmp_path):
    """The real launcher: two gloo processes, the global batch split between them, one run directory
    written by rank 0 only, resumable; a batch the processes cannot split is refused before training."""
    import json

    out = tmp_path / "run"
    done = _torchrun(out, "--batch-size", "64")
    if _died_of_signal(done):
        # A process killed by a signal: CI once saw SIGABRT in rank 1, and a fresh-clone `make test` once (rank 1
        # aborting in gloo's teardown at exit, "terminate called without an active exception"; none in 80 runs
        # of this command alone). Since then the ranks meet at a barrier before leaving the process group
        # (selfsup.distributed.shutdown); should it recur, it is shown as a warning and the run tried once more.
        # (seen again in a fresh-clone suite of 2026-11-30 with the barrier in place: rank 1, "terminate called
        # without an active exception", no Python frame; 0 of 25 runs of this command alone on a loaded machine.
        # The stdout tail says whether rank 0 had finished: its last line is "done: …". Since 2026-12-01 a finished
        # worker leaves with os._exit, skipping the interpreter's teardown (selfsup.distributed.leave_worker).)
        warnings.warn("torchrun: a process died of a signal; retrying once. Its output:\n"
                      + _children_output(done.stderr) + "\nstdout, last lines:\n" + done.stdout[-1500:], stacklevel=1)
        shutil.rmtree(out, ignore_errors=True)
        done = _torchrun(out, "--batch-size", "64")
    assert done.returncode == 0, _children_output(done.stderr)
    assert (out / "encoder.pt").is_file() and (out / "checkpoints" / "last.pt").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "epoch_time_s" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]  # one writer: no record twice
    steps = [r["step"] for r in records if "epoch_time_s" not in r and "step" in r]
    assert steps == sorted(set(steps))
    env = json.loads((out / "env.json").read_text())
    assert env.get("world_size") == WORLD, env
    bad = _torchrun(tmp_path / "bad", "--batch-size", "63")
    assert bad.returncode != 0 and "not divisible by the 2 processes" in bad.stderr
    assert not (tmp_path / "bad" / "checkpoints" / "last.pt").exists()


# ---------------------------------------------------------------- DINOv2 / iBOT / DCCAE parts (issue #19)

def _parts_rank(rank: int, tmp: str, data: dict) -> None:
    """Each of two processes holds its rows (different counts where the parts allow it) and calls every
    part with gather=True; what it returns is saved for the parent to compare with one process."""
    from selfsup.losses.cca import cca_correlation
    from selfsup.losses.clustering import sinkhorn_knopp
    from selfsup.losses.distillation import koleo_loss, update_center
    from selfsup.losses.ibot import patch_sinkhorn_targets

    out = {}
    with gloo_group(rank, WORLD, init_file=f"{tmp}/init"):
        for name, split in (("equal", 4), ("unequal", 5), ("empty", 8)):  # rank 0 holds `split` of 8 rows
            rows = data["logits"][:split] if rank == 0 else data["logits"][split:]
            out[f"sinkhorn_{name}"] = sinkhorn_knopp(rows, 0.07, 3, gather=True)
        b = data["patches"].shape[0] // WORLD
        mine = slice(rank * b, (rank + 1) * b)
        out["patch_targets"] = patch_sinkhorn_targets(data["patches"][mine], data["mask"][mine], 0.07, gather=True)
        out["center"] = update_center(data["center"], data["patches"][mine], 0.9, mask=data["mask"][mine], gather=True)
        n = data["h1"].shape[0] // WORLD
        rows = slice(rank * n, (rank + 1) * n)
        x = data["x"][rows].clone().requires_grad_(True)
        loss = koleo_loss(x, gather=True)
        loss.backward()
        out["koleo"] = (loss.detach(), x.grad)
        h1, h2 = (data[k][rows].clone().requires_grad_(True) for k in ("h1", "h2"))
        corr = cca_correlation(h1, h2, 1e-3, 1e-3, gather=True)
        corr.backward()
        out["cca"] = (corr.detach(), h1.grad, h2.grad)
        torch.save(out, f"{tmp}/rank{rank}.pt")


def test_dinov2_ibot_dccae_parts_match_one_process(tmp_path):
    """Sinkhorn-Knopp teacher targets (equal, unequal and empty shares of the rows), the masked patch targets
    and the patch centre (masks with different counts per process), KoLeo and the CCA correlation with
    gather=True: two gloo processes reproduce one process holding the combined batch. For the two losses
    the row gradients (summed over processes by the gather's backward) are world × the combined-batch ones,
    which DDP's averaging turns into the single-process gradient."""
    from selfsup.losses.cca import cca_correlation
    from selfsup.losses.clustering import sinkhorn_knopp
    from selfsup.losses.distillation import koleo_loss, update_center
    from selfsup.losses.ibot import patch_sinkhorn_targets

    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    mask = torch.rand(6, 9, generator=g) < 0.4
    mask[0] = True  # rank 0 holds many more masked tokens than rank 1
    mask[3:] = False
    mask[4, 2] = True
    data = {"logits": torch.randn(8, 5, generator=g, dtype=f64), "patches": torch.randn(6, 9, 5, generator=g, dtype=f64),
            "mask": mask, "center": torch.randn(1, 1, 5, generator=g, dtype=f64),
            "x": torch.randn(10, 4, generator=g, dtype=f64), "h1": torch.randn(10, 3, generator=g, dtype=f64),
            "h2": torch.randn(10, 3, generator=g, dtype=f64)}
    data["h2"] = data["h2"] + data["h1"]
    mp.spawn(_parts_rank, args=(str(tmp_path), data), nprocs=WORLD)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    single = sinkhorn_knopp(data["logits"], 0.07, 3)
    for name in ("sinkhorn_equal", "sinkhorn_unequal", "sinkhorn_empty"):
        torch.testing.assert_close(torch.cat([got[0][name], got[1][name]]), single, msg=name)
    torch.testing.assert_close(torch.cat([got[0]["patch_targets"], got[1]["patch_targets"]]),
                               patch_sinkhorn_targets(data["patches"], mask, 0.07))
    center = update_center(data["center"], data["patches"], 0.9, mask=mask)
    for r in range(WORLD):
        torch.testing.assert_close(got[r]["center"], center)

    x = data["x"].clone().requires_grad_(True)
    koleo = koleo_loss(x)
    koleo.backward()
    torch.testing.assert_close((got[0]["koleo"][0] + got[1]["koleo"][0]) / WORLD, koleo.detach())
    torch.testing.assert_close(torch.cat([got[0]["koleo"][1], got[1]["koleo"][1]]) / WORLD, x.grad)

    h1, h2 = data["h1"].clone().requires_grad_(True), data["h2"].clone().requires_grad_(True)
    corr = cca_correlation(h1, h2, 1e-3, 1e-3)
    corr.backward()
    for r in range(WORLD):
        torch.testing.assert_close(got[r]["cca"][0], corr.detach())  # every process: the global statistic
    torch.testing.assert_close(torch.cat([got[0]["cca"][1], got[1]["cca"][1]]) / WORLD, h1.grad)
    torch.testing.assert_close(torch.cat([got[0]["cca"][2], got[1]["cca"][2]]) / WORLD, h2.grad)


# ---------------------------------------------------------------- iBOT / DINOv2 at the method level (issue #19)
# Both draw their masks inside training_step (stochastic_step), so the registry-wide parity above leaves them out.
# Here every process gets its rows of masks drawn once for the combined batch (draw_masks replaced), and the
# methods' cross-sample terms meet one process on the combined batch: DINOv2's Sinkhorn-Knopp targets of the
# [CLS] and of the masked patch tokens (gathered, unequal masked counts per process), iBOT's two centres
# (after_step). DINOv2's KoLeo is per process by design (the paper's), so it is off here; its gathered variant
# is checked at the loss level above.

MASKED_DISTILLATION = {"ibot": {}, "dinov2": {"koleo_loss_weight": 0.0}}


def _masked_method(name: str, gather: bool):
    from conftest import TINY_BACKBONES
    from selfsup.nn.backbones import build_backbone

    torch.manual_seed(0)
    cls = METHODS[name].cls
    backbone = build_backbone("vit_tiny", 1, 16, **TINY_BACKBONES["vit_tiny"])
    return cls(backbone, **cls.spec.test_params, **MASKED_DISTILLATION[name], gather=gather).eval()


def _masked_inputs(name: str, n: int):
    """The views (with local crops) and (2n, L) masks of a combined batch of n images; masks differ in count."""
    from selfsup.nn.masking import blockwise_masks
    from selfsup.views import make_views
    from test_methods import tiny_recipe

    method = _masked_method(name, False)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
    torch.manual_seed(2)
    views = make_views(images, tiny_recipe(method), [0.5], [0.25])
    masks = blockwise_masks(2 * n, method.backbone.grid_size, (0.1, 0.5), 0.7, generator=g)
    return views, masks


def _masked_step(method, views, masks):
    from selfsup.methods.base import run_after_step

    method.draw_masks = lambda batch, grid, device: masks
    progress = make_progress(method, 5, 100, 0, 10)
    loss, logs = method.training_step(views, progress)
    method.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}
    run_after_step(method, progress, logs)
    return loss.detach(), grads, {k: v.clone() for k, v in method.named_buffers()}


def _masked_worker(rank: int, name: str, port: int, out_dir: str, b: int) -> None:
    with gloo_group(rank, WORLD, port):
        views, masks = _masked_inputs(name, WORLD * b)
        mine = slice(rank * b, (rank + 1) * b)
        views = [v[mine] for v in views]
        n = WORLD * b  # masks are view-major over the combined batch: view 0's n rows, then view 1's
        masks = torch.cat([masks[:n][mine], masks[n:][mine]])
        loss, grads, buffers = _masked_step(_masked_method(name, True), views, masks)
        dist.all_reduce(loss)
        for g in grads.values():
            dist.all_reduce(g)
            g /= WORLD
        torch.save({"loss": loss / WORLD, "grads": grads, "buffers": buffers, "masked": int(masks.sum())},
                   os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("name", sorted(MASKED_DISTILLATION))
def test_masked_distillation_two_processes_match_one(name):
    b = 6
    views, masks = _masked_inputs(name, WORLD * b)
    single_loss, single_grads, single_buffers = _masked_step(_masked_method(name, False), views, masks)
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_masked_worker, args=(name, _free_port(), out, b), nprocs=WORLD, join=True)
        got = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]
    assert got[0]["masked"] != got[1]["masked"]  # the processes hold different numbers of masked tokens
    torch.testing.assert_close(got[0]["loss"], single_loss, rtol=1e-5, atol=1e-6)
    scale = max(float(g.abs().max()) for g in single_grads.values())
    assert got[0]["grads"].keys() == single_grads.keys()
    for key, g in single_grads.items():
        torch.testing.assert_close(got[0]["grads"][key], g, rtol=1e-4, atol=1e-6 + 1e-5 * scale,
                                   msg=f"{name}: gradient of {key}")
    for r in range(WORLD):  # iBOT's centres: every process holds the combined batch's
        for key in ("center", "patch_center"):
            if key in single_buffers:
                torch.testing.assert_close(got[r]["buffers"][key], single_buffers[key], msg=f"{name}: {key}")
