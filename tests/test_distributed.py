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
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selfsup.methods import METHODS
from selfsup.methods.base import make_progress
from selfsup.methods.registry import method_params

WORLD = 2
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
    method = _build(name, False)
    from selfsup.views import make_views, resolve_sizes

    recipe = resolve_sizes(method.spec.views, 16)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, METHODS[name].spec.test_in_chans, 16, 16), generator=g,
                           dtype=torch.uint8)
    torch.manual_seed(2)
    c = images.shape[1]
    return make_views(images, recipe, [0.5] * c, [0.25] * c)


def _step(method, views):
    torch.manual_seed(3)
    loss, _ = method.training_step(views, make_progress(method, 5, 100, 0, 10))
    method.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _worker(rank: int, name: str, port: int, out_dir: str, b: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        views = [v[rank * b : (rank + 1) * b] for v in _views(name, WORLD * b)]
        loss, grads = _step(_build(name, gather=True), views)
        dist.all_reduce(loss)
        for g in grads.values():  # DDP: average the gradients over processes
            dist.all_reduce(g)
            g /= WORLD
        if rank == 0:
            torch.save({"loss": loss / WORLD, "grads": grads}, os.path.join(out_dir, "dist.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", GATHER_METHODS)
def test_two_processes_match_one(name):
    b = 8
    single_loss, single_grads = _step(_build(name, gather=False), _views(name, WORLD * b))
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


def test_gather_is_identity_on_one_process():
    from selfsup.distributed import all_reduce_mean, gather, gather_no_grad

    x = torch.randn(3, 4, requires_grad=True)
    assert gather(x) is x and gather_no_grad(x) is x
    torch.testing.assert_close(all_reduce_mean(x), x)


def _torchrun(out, *extra: str) -> "subprocess.CompletedProcess[str]":
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "selfsup", "pretrain", "--method", "simclr", "--data", "digits", "--limit", "512", "--epochs", "2",
           "--threads", "1", "--device", "cpu", "--no-progress", "--out", str(out),
           "--set", "backbone.params.widths=[8,16]", "--set", "train.log_every=2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_and_write_one_run(tmp_path):
    """The real launcher: two gloo processes, the global batch split between them, one run directory
    written by rank 0 only, resumable; a batch the processes cannot split is refused before training."""
    import json

    out = tmp_path / "run"
    done = _torchrun(out, "--batch-size", "64")
    assert done.returncode == 0, done.stderr[-2000:]
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
