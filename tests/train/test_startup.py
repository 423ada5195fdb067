"""The time a run takes to start training is recorded in env.json, in total and by part."""
from __future__ import annotations

import json
import sys

import pytest

from selfsup.config import load_config
from selfsup.train.loop import pretrain
from selfsup.train.startup import StartupClock, process_age


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the process age is read from /proc")
def test_process_age_is_the_time_since_this_process_started():
    clock = StartupClock()
    assert clock.before_setup_s is not None and 0 < clock.before_setup_s < 24 * 3600
    later = process_age()
    assert later >= clock.before_setup_s


def test_env_json_records_the_time_to_the_first_step(tmp_path):
    cfg = load_config(None, {"data.name": "digits", "method.name": "simclr", "train.epochs": 1,
                             "train.batch_size": 64, "backbone.name": "small_resnet",
                             "backbone.params": {"widths": [8, 16]}, "method.params": {"proj_hidden": 32},
                             "train.knn_every": 0, "train.progress": False, "train.threads": 1})
    pretrain(cfg, tmp_path / "run")
    startup = json.loads((tmp_path / "run" / "env.json").read_text())["startup"]
    parts, cpu = startup["parts_s"], startup["parts_cpu_s"]
    assert set(parts) == set(cpu) >= {"data", "mean_std", "model", "other_setup", "first_step"}
    if startup["from"] == "process start":
        assert "imports" in parts
    assert sum(parts.values()) == pytest.approx(startup["first_step_s"], abs=0.05)
    assert all(v >= 0 for v in cpu.values()) and startup["first_step_cpu_s"] > 0
