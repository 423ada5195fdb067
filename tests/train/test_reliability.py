"""Reliability: kill anywhere and resume exactly, safe loading, bad numbers, full disks, bad configs.

Runs use scikit-learn's digits (8×8) with a tiny CNN so a whole run takes a few seconds.
"""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selfsup.config import ConfigError, config_from_dict, load_config
from selfsup.train.checkpoint import CheckpointError, atomic_save, check_compatible, safe_load

KILL_SEEDS = (0, 1, 2, 3)
ARGS = ["--data", "digits", "--method", "simclr", "--epochs", "3", "--batch-size", "64", "--threads", "1",
        "--no-progress", "--set", "backbone.params.widths=[8,16,32]", "--set", "method.params.proj_hidden=64",
        "--set", "train.log_every=1", "--set", "train.knn_every=0", "--set", "train.checkpoint_steps=3"]


def _run(out: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "selfsup", "pretrain", *ARGS, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _step_losses(run: Path) -> dict[int, float]:
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "lr" in r}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("ref") / "run"
    t0 = time.perf_counter()
    proc = _run(out)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    return out, time.perf_counter() - t0


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_sigkill_at_a_random_moment_then_resume_matches(seed, reference_run, tmp_path):
    """SIGKILL at a random moment (mid-step or mid-checkpoint-write), resume with the same command:
    every logged step's loss equals the uninterrupted run's, bit for bit."""
    ref, duration = reference_run
    out = tmp_path / "run"
    proc = _run(out)
    time.sleep(random.Random(seed).uniform(0.3, 1.0) * duration)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    ckpt = out / "checkpoints" / "last.pt"
    killed_at = int(safe_load(ckpt)["step"]) if ckpt.exists() else 0
    resumed = _run(out)
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    expected, got = _step_losses(ref), _step_losses(out)
    assert got == expected, f"seed {seed}: resumed run (killed after checkpoint step {killed_at}) diverged"
    assert not list((out / "checkpoints").glob(".*.tmp")), "half-written checkpoint files were left behind"
    torch.testing.assert_close(safe_load(out / "encoder.pt"), safe_load(ref / "encoder.pt"), rtol=0, atol=0)
    print(f"kill seed {seed}: killed with last checkpoint at step {killed_at}; resumed run matched")


def test_sigterm_saves_then_resumes_exactly(reference_run, tmp_path):
    ref, duration = reference_run
    out = tmp_path / "run"
    proc = _run(out)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len(_step_losses(out)) < 5:  # wait until training runs
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, log
    saved = int(safe_load(out / "checkpoints" / "last.pt")["step"])
    assert saved >= 5
    resumed = _run(out)
    assert resumed.wait(timeout=300) == 0
    assert _step_losses(out) == _step_losses(ref)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_with_pickled_callable_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        safe_load(path)


def test_evaluate_refuses_pickled_encoder(tmp_path, reference_run):
    import shutil

    ref, _ = reference_run
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    torch.save({"weights": Evil()}, run / "encoder.pt")
    proc = subprocess.run([sys.executable, "-m", "selfsup", "evaluate", str(run), "--protocol", "knn"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "refusing to load" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_of_another_method_names_the_mismatch():
    ckpt = {"meta": {"format": 1, "method": "byol", "backbone": "resnet18"}}
    with pytest.raises(CheckpointError, match="method 'byol', not 'simclr'.*backbone 'resnet18', not 'small_resnet'"):
        check_compatible(ckpt, "simclr", "small_resnet")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"w": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        safe_load(path)


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, path)
    before = path.read_bytes()

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("selfsup.train.checkpoint.torch.save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        atomic_save({"step": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "the temporary file must be removed"


def test_nan_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    """NaN from step 4 on: steps are skipped and counted, then the run stops with the figures, and the
    last good checkpoint is intact."""
    from selfsup.methods.simclr import SimCLR
    from selfsup.train.loop import TrainingError, pretrain

    original = SimCLR.training_step

    def poisoned(self, views, progress):
        loss, logs = original(self, views, progress)
        return (loss * float("nan"), logs) if progress.step >= 4 else (loss, logs)

    monkeypatch.setattr(SimCLR, "training_step", poisoned)
    cfg = load_config(None, {"data.name": "digits", "train.epochs": 1, "train.batch_size": 64, "train.progress": False,
                             "train.checkpoint_steps": 2, "train.max_bad_steps": 3, "train.knn_every": 0,
                             "backbone.params": {"widths": [8, 16]}, "method.params": {"proj_hidden": 32}})
    with pytest.raises(TrainingError, match=r"stopped at step 4: 3 consecutive steps.*lr") as err:
        pretrain(cfg, tmp_path / "run")
    assert "intact" in str(err.value)
    assert int(safe_load(tmp_path / "run" / "checkpoints" / "last.pt")["step"]) == 4
    skipped = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in skipped if r.get("skipped")) == 3


def test_bad_config_lists_every_problem():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train": {"epoch": 3, "batch_size": "big", "precision": "fp8"},
                          "optim": {"lr": -1.0, "name": "adam"}, "colour": 1})
    text = str(err.value)
    for needle in ("train.epoch' (did you mean 'epochs'?)", "train.batch_size: expected an integer",
                   "train.precision must be", "optim.lr must be > 0", "optim.name must be", "unknown key 'colour'"):
        assert needle in text, needle
    assert len(err.value.problems) == 6


def test_cli_errors_have_no_traceback(tmp_path):
    cases = [(["--method", "nosuch"], "unknown method 'nosuch'"),
             (["--backbone", "nosuch"], "unknown backbone 'nosuch'"),
             (["--data", str(tmp_path / "missing")], "unknown dataset"),
             (["--data", "digits", "--batch-size", "1"], "batch_size must be ≥ 2"),
             (["--data", "digits", "--batch-size", "5000"], "larger than the"),
             (["--data", "digits", "--set", "method.params.temperature=0"], "temperature must be > 0")]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((["--data", str(empty)], "holds no image files"))
    for args, needle in cases:
        proc = subprocess.run([sys.executable, "-m", "selfsup", "pretrain", *args, "--out", str(tmp_path / "r"),
                               "--no-progress"], capture_output=True, text=True)
        assert proc.returncode == 2, (args, proc.stderr)
        assert needle in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    from selfsup.data import DataError
    from selfsup.data.fashion_mnist import load_fashion_mnist

    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path / "nowhere"))
