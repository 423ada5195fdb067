"""``train.compile``: its values, and a compiled run that trains, records its compile time and resumes exactly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfsup.config import ConfigError, compile_mode, config_from_dict

ARGS = ["--data", "digits", "--method", "simclr", "--epochs", "2", "--batch-size", "64", "--limit", "512",
        "--threads", "1", "--no-progress", "--set", "backbone.params.widths=[8,16,32]",
        "--set", "method.params.proj_hidden=64", "--set", "train.log_every=1", "--set", "train.knn_every=0",
        "--set", "train.compile=on"]


@pytest.mark.parametrize("value, mode", [(True, "on"), (False, "off"), ("on", "on"), ("off", "off"),
                                         ("backbone", "backbone")])
def test_compile_values(value, mode):
    cfg = config_from_dict({"train": {"compile": value}})
    assert compile_mode(cfg.train.compile) == mode


def test_bad_compile_value_is_named():
    with pytest.raises(ConfigError, match="train.compile"):
        config_from_dict({"train": {"compile": "max"}})


def _pretrain(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selfsup", "pretrain", *ARGS, "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "lr" in r}


@pytest.mark.slow
def test_compiled_run_records_compile_time_and_resumes_exactly(tmp_path):
    """A compiled run stopped by SIGTERM mid-epoch and resumed (compiling again) logs the same losses, bit for
    bit, as one uninterrupted compiled run; the compile time is in env.json and the first epoch's summary."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    done = _pretrain(ref)
    assert done.returncode == 0, done.stdout + done.stderr
    env = json.loads((ref / "env.json").read_text())
    assert env["compile"] == "on" and env["compile_s"] > 0
    epochs = [json.loads(ln) for ln in (ref / "metrics.jsonl").read_text().splitlines() if '"epoch_time_s"' in ln]
    assert "compile_s" in epochs[0] and "compile_s" not in epochs[1]
    proc = subprocess.Popen([sys.executable, "-m", "selfsup", "pretrain", *ARGS, "--out", str(cut)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 900
    while not (cut / "metrics.jsonl").exists() or len(_losses(cut)) < 3:  # compiled and training
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, log
    resumed = _pretrain(cut)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _losses(cut) == _losses(ref)


def test_busy_machine_warning(monkeypatch, caplog):
    import torch

    from selfsup.train import setup

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(setup.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(setup.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    with caplog.at_level("WARNING", logger="selfsup"):
        assert setup.warn_if_oversubscribed()
    assert "--threads 1" in caplog.text
    monkeypatch.setattr(setup.os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    assert not setup.warn_if_oversubscribed()
    monkeypatch.setattr(setup.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert not setup.warn_if_oversubscribed()
