"""The collapse monitor's state (its reference rank above all) survives a real checkpoint round trip through the
training loop: a run stopped mid-way and resumed judges its rank against the ranks of its own start, as an
uninterrupted run does; a checkpoint written before the state was saved still resumes, with a fresh monitor.

Same tiny digits settings as tests/monitor/test_diagnostics.py's loop tests, over two epochs so there is a rest
to resume."""
from __future__ import annotations

import itertools
import shutil

import pytest

from selfsup.config import load_config
from selfsup.train import loop
from selfsup.train.checkpoint import atomic_save, safe_load
from selfsup.train.rundir import read_metrics

STOP_AT = 5  # the SIGTERM path saves a checkpoint after this step; the monitor's reference comes from steps 1–3


def _config():
    return load_config(None, {
        "method.name": "simclr", "data.name": "digits", "data.limit": 256, "backbone.name": "small_resnet",
        "backbone.widths": [8, 16, 32], "train.epochs": 2, "train.batch_size": 32, "train.threads": 1,
        "train.log_every": 1, "train.progress": False, "train.device": "cpu", "train.knn_every": 0})


def _monitor_state(run_dir):
    return safe_load(run_dir / "checkpoints" / "last.pt")["collapse_monitor"]


def _ranks(run_dir, after: int = 0) -> list[float]:
    """The effective rank of each logged step after ``after``, in order (what the monitor was fed)."""
    return [r["rank"] for r in read_metrics(run_dir) if "rank" in r and "lr" in r and r["step"] > after]


def test_the_reference_rank_survives_a_checkpoint_round_trip(tmp_path, monkeypatch) -> None:
    cfg = _config()
    loop.pretrain(cfg, tmp_path / "whole")
    whole = _monitor_state(tmp_path / "whole")
    assert whole["reference"] == _ranks(tmp_path / "whole")[:3]

    with monkeypatch.context() as m:  # a SIGTERM after step STOP_AT: the loop saves a checkpoint and exits
        calls = itertools.count(1)
        m.setattr(loop._StopFlag, "requested", lambda self, device: next(calls) >= STOP_AT)
        with pytest.raises(SystemExit):
            loop.pretrain(cfg, tmp_path / "cut")
    assert safe_load(tmp_path / "cut" / "checkpoints" / "last.pt")["step"] == STOP_AT
    assert _monitor_state(tmp_path / "cut")["reference"] == whole["reference"]
    old, inflated = tmp_path / "old", tmp_path / "inflated"
    shutil.copytree(tmp_path / "cut", old)
    shutil.copytree(tmp_path / "cut", inflated)

    loop.pretrain(cfg, tmp_path / "cut")  # resumed: ends in the same monitor state as the uninterrupted run
    assert _ranks(tmp_path / "cut") == _ranks(tmp_path / "whole")
    assert _monitor_state(tmp_path / "cut") == whole

    # the restored reference is the one the resumed run warns against: one no rank can stay near warns
    ckpt = safe_load(inflated / "checkpoints" / "last.pt")
    ckpt["collapse_monitor"]["reference"] = [1e6]
    atomic_save(ckpt, inflated / "checkpoints" / "last.pt")
    loop.pretrain(cfg, inflated)
    fired = [r["collapse_warning"] for r in read_metrics(inflated) if "collapse_warning" in r]
    assert [(w["kind"], w["step"], w["reference_rank"]) for w in fired] == [("dimensional", STOP_AT + 3, 1e6)]

    # a checkpoint from before the monitor's state was saved resumes; the monitor starts afresh, as it used to
    ckpt = safe_load(old / "checkpoints" / "last.pt")
    del ckpt["collapse_monitor"]
    atomic_save(ckpt, old / "checkpoints" / "last.pt")
    loop.pretrain(cfg, old)
    assert _ranks(old) == _ranks(tmp_path / "whole")
    assert _monitor_state(old)["reference"] == _ranks(old, after=STOP_AT)[:3]
