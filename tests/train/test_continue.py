"""Continuing a finished run for more epochs: the same command with a larger ``--epochs`` resumes from
``checkpoints/last.pt`` (its step count goes on), every schedule joins the longer run's without a jump
(:class:`selfsup.schedules.Horizon`), the continuation is recorded, any other change is still refused, and an
interrupted continuation resumes like any run.

Tiny digits runs (7 steps per epoch, a 2-layer CNN, one thread); ``warmup_epochs: 0`` so that the finished
run's learning rate has decayed to near 0, where extending the cosine naively would jump up to half the base."""
from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest
import torch

from selfsup.config import ConfigError, load_config
from selfsup.schedules import Horizon, cosine_schedule, warmup_cosine
from selfsup.train import loop
from selfsup.train.checkpoint import safe_load
from selfsup.train.rundir import read_metrics

SETTINGS = {"method.name": "simclr", "data.name": "digits", "data.limit": 256, "backbone.name": "small_resnet",
            "backbone.widths": [8, 16], "train.batch_size": 32, "train.threads": 1, "train.log_every": 1,
            "train.progress": False, "train.device": "cpu", "train.knn_every": 0, "optim.warmup_epochs": 0}
SPE = 7  # (256 images − 25 held out) // 32


def _config(epochs: int, **changes):
    return load_config(None, {**SETTINGS, "train.epochs": epochs, **changes})


def _lrs(run_dir) -> dict[int, float]:
    """The learning rate of each step, from metrics.jsonl (the record of step k holds the lr step k used)."""
    return {r["step"]: r["lr"] for r in read_metrics(run_dir) if "lr" in r and not r.get("skipped")}


def _expected_lr(horizon: Horizon, step: int) -> float:
    base = 0.3 * 32 / 256
    return horizon.value(lambda s, n: warmup_cosine(s, n, 0, base, 0.0), step)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch run (kept read-only: tests copy it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    loop.pretrain(_config(1), out)
    return out


def _copy(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------- the rule, on its own


def test_horizon_without_continuation_is_the_planned_schedule():
    h = Horizon(100)
    at = lambda s, n: warmup_cosine(s, n, 10, 1.0)  # noqa: E731
    assert [h.value(at, s) for s in range(100)] == [at(s, 100) for s in range(100)]
    assert h.total_steps == 100 and Horizon.from_state(h.state_dict(), 5) == h
    assert Horizon.from_state(None, 100) == h  # a checkpoint from before horizons were saved


def test_a_continuation_joins_the_longer_schedule_without_a_jump():
    at = lambda s, n: cosine_schedule(s / n, 1.0, 0.0)  # noqa: E731
    h = Horizon(100).continued(100, 200, 20)
    values = [h.value(at, s) for s in range(200)]
    assert values[:100] == [at(s, 100) for s in range(100)]  # the steps already taken: unchanged
    assert values[120:] == [at(s, 200) for s in range(120, 200)]  # then the schedule of a 200-step run
    ramp = values[99:121]  # from the value reached, linearly, to the longer schedule's at step 120
    steps = [b - a for a, b in zip(ramp, ramp[1:])]
    assert max(steps) - min(steps) < 1e-12 and 0 < steps[0] < (at(120, 200) - at(99, 100)) / 20
    assert at(100, 200) - at(99, 100) > 10 * steps[0]  # what the naive extension would jump by
    # a second continuation joins from the values of the first
    h2 = h.continued(150, 300, 10)
    assert [h2.value(at, s) for s in range(150)] == values[:150]
    assert h2.value(at, 160) == at(160, 300) and Horizon.from_state(h2.state_dict(), 1) == h2
    momentum = lambda s, n: cosine_schedule(s / n, 0.996, 1.0)  # noqa: E731  rises: joins from above
    m = [h.value(momentum, s) for s in range(95, 125)]
    assert all(abs(b - a) < 1e-4 for a, b in zip(m, m[1:]))


def test_the_methods_schedules_go_through_the_horizon():
    """make_progress evaluates a method's declared schedules (teacher momentum) through the run's horizon."""
    from torch import nn

    from selfsup.methods.base import make_progress
    from selfsup.schedules import Schedule

    class Teacher(nn.Module):
        def schedules(self):
            return {"teacher_momentum": Schedule(0.996, 1.0), "teacher_temp": Schedule(0.04, 0.07, "warmup", 1)}

    h = Horizon(20).continued(20, 40, 5)
    for step in (0, 19, 20, 22, 25, 39):
        p = make_progress(Teacher(), step, 20, step // 10, 10, h)
        assert p.total_steps == 40
        assert p.value("teacher_momentum") == h.value(lambda k, n: cosine_schedule(k / n, 0.996, 1.0), step)
        temp = Schedule(0.04, 0.07, "warmup", 1).at(step, 20, 10)  # a warm-up over absolute steps: any horizon's
        assert math.isclose(p.value("teacher_temp"), temp)
    assert make_progress(Teacher(), 7, 20, 0, 10).values == make_progress(Teacher(), 7, 20, 0, 10, Horizon(20)).values


# ---------------------------------------------------------------- real runs


def test_the_same_command_with_more_epochs_continues_the_run(finished, tmp_path, caplog):
    run = _copy(finished, tmp_path)
    before = safe_load(run / "encoder.pt")
    one_epoch = _lrs(run)
    with caplog.at_level("INFO", logger="selfsup"):
        loop.pretrain(_config(2), run)
    assert "continuing" in caplog.text and "1 → 2 epochs from step 7" in caplog.text

    records = read_metrics(run)
    steps = [r["step"] for r in records if "lr" in r]
    assert steps == list(range(1, 2 * SPE + 1))  # not restarted: the step count goes on
    assert [r["epoch"] for r in records if "epoch_time_s" in r] == [1, 2]
    assert safe_load(run / "checkpoints" / "last.pt")["step"] == 2 * SPE

    lrs = _lrs(run)
    assert {s: lrs[s] for s in one_epoch} == one_epoch  # the first epoch's record is kept as it was
    horizon = Horizon(SPE).continued(SPE, 2 * SPE, 3)  # blend: one epoch, at most half the 7 added steps
    for step, lr in lrs.items():
        assert math.isclose(lr, _expected_lr(horizon, step - 1), rel_tol=1e-12), step
    rise = max(lrs[s + 1] - lrs[s] for s in range(SPE, 2 * SPE))
    naive_jump = warmup_cosine(SPE, 2 * SPE, 0, 0.0375, 0.0) - lrs[SPE]
    assert rise < naive_jump / 3, (rise, naive_jump)  # no jump up where it continued
    assert lrs[2 * SPE] < 0.1 * max(lrs.values())  # and it decays again to the new end

    after = safe_load(run / "encoder.pt")
    assert any(not torch.equal(before[k], after[k]) for k in before)

    (continued,) = [r for r in records if "continued" in r]
    assert continued["step"] == SPE and continued["continued"]["from_epochs"] == 1
    assert continued["continued"]["to_epochs"] == 2 and "rule" in continued["continued"]
    env = json.loads((run / "env.json").read_text())
    assert [c["from_step"] for c in env["continued"]] == [SPE]
    assert "epochs: 2" in (run / "config.yaml").read_text()
    assert safe_load(run / "checkpoints" / "last.pt")["horizon"] == horizon.state_dict()

    with pytest.raises(ConfigError, match="run of 2 epochs: it can be continued for more epochs, not cut to 1"):
        loop.pretrain(_config(1), run)  # fewer epochs than it has done


@pytest.mark.parametrize("changes, keys", [
    ({"method.name": "byol"}, ["method.name"]),
    ({"backbone.widths": [8, 32]}, ["backbone.params.widths"]),
    ({"data.image_size": 16, "optim.lr": 0.1}, ["data.image_size", "optim.lr"]),
])
def test_any_other_change_is_still_refused_naming_the_keys(finished, changes, keys):
    with pytest.raises(ConfigError, match="different config") as err:
        loop.pretrain(_config(2, **changes), finished)
    for key in keys:
        assert f"{key}:" in str(err.value)
    assert "train.epochs" not in str(err.value)


def test_an_interrupted_continuation_resumes(finished, tmp_path, monkeypatch):
    run = _copy(finished, tmp_path)
    with monkeypatch.context() as m:  # SIGTERM after 3 steps of the continuation: checkpoint, exit
        calls = itertools.count(1)
        m.setattr(loop._StopFlag, "requested", lambda self, device: next(calls) >= 3)
        with pytest.raises(SystemExit):
            loop.pretrain(_config(3), run)
    assert safe_load(run / "checkpoints" / "last.pt")["step"] == SPE + 3
    loop.pretrain(_config(3), run)  # the same command again: resumes the continuation, not a second one

    records = read_metrics(run)
    assert [r["step"] for r in records if "lr" in r] == list(range(1, 3 * SPE + 1))
    assert len([r for r in records if "continued" in r]) == 1
    horizon = Horizon(SPE).continued(SPE, 3 * SPE, SPE)
    assert safe_load(run / "checkpoints" / "last.pt")["horizon"] == horizon.state_dict()
    for step, lr in _lrs(run).items():
        assert math.isclose(lr, _expected_lr(horizon, step - 1), rel_tol=1e-12), step
