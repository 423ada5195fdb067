"""CollapseMonitor.state_dict / load_state_dict: a monitor restored from a checkpoint warns exactly as the
uninterrupted one does (selfsup/monitor/collapse.py). The end-to-end round trip through the training loop's
checkpoints is in tests/train/test_resume_collapse_monitor.py."""
from __future__ import annotations

import io

import torch

from selfsup.monitor.collapse import CollapseMonitor

B, D = 512, 256  # absolute rank bar 0.05 × 256 = 12.8; with reference 100 the bar is 0.35 × 100 = 35
Z = torch.empty(B, D)  # the monitor reads only the batch's shape from it
HEALTHY_SPREAD = 0.9 / D ** 0.5


def _feed(monitor: CollapseMonitor, ranks: list[float], start: int) -> list[dict]:
    """One logged check per rank, at steps start, start + 1, …; the warnings that fired."""
    fired = [monitor.update(start + i, {"spread": HEALTHY_SPREAD, "rank": r, "energy_gap": 0.5}, Z)
             for i, r in enumerate(ranks)]
    return [f["collapse_warning"] for f in fired if f]


def _checkpointed(monitor: CollapseMonitor) -> CollapseMonitor:
    """A fresh monitor loaded from ``monitor``'s state after a real save and weights-only load."""
    buf = io.BytesIO()
    torch.save({"collapse_monitor": monitor.state_dict()}, buf)
    buf.seek(0)
    restored = CollapseMonitor(verbose=False)
    restored.load_state_dict(torch.load(buf, weights_only=True)["collapse_monitor"])
    return restored


BEFORE = [100.0, 95.0, 90.0, 30.0]  # reference 100, then the first low check (30 < 35)
AFTER = [30.0, 30.0, 30.0, 30.0]  # sustained: the second and third low checks in a row warn at step 5


def test_a_restored_monitor_warns_exactly_as_the_uninterrupted_one() -> None:
    uninterrupted = CollapseMonitor(verbose=False)
    expected = _feed(uninterrupted, BEFORE + AFTER, start=0)
    assert [(w["kind"], w["step"], w["since_step"]) for w in expected] == [("dimensional", 5, 3)]

    killed = CollapseMonitor(verbose=False)
    assert _feed(killed, BEFORE, start=0) == []
    resumed = _checkpointed(killed)
    assert resumed.reference_rank == 100.0
    assert _feed(resumed, AFTER, start=len(BEFORE)) == expected  # same step, streak start, figures, message
    assert resumed.state_dict() == uninterrupted.state_dict()

    # what happened before this change: a fresh monitor takes the collapsed 30 as its reference and stays silent
    fresh = CollapseMonitor(verbose=False)
    assert _feed(fresh, AFTER, start=len(BEFORE)) == [] and fresh.reference_rank == 30.0


def test_a_warned_episode_survives_the_resume_neither_lost_nor_repeated() -> None:
    killed = CollapseMonitor(verbose=False, stops=True)
    (warning,) = _feed(killed, BEFORE + AFTER, start=0)
    resumed = _checkpointed(killed)
    assert resumed.collapsed and resumed.should_stop()  # the stop decision carries over
    assert "dimensional collapse (spread" in resumed.stop_message() and resumed.warnings == [warning]
    assert _feed(resumed, [30.0, 30.0], start=8) == []  # the same episode: no second warning
    assert _feed(resumed, [90.0], start=10) == [] and not resumed.collapsed  # recovered: re-armed
    assert len(_feed(resumed, [30.0] * 3, start=11)) == 1  # a new episode warns again


def test_the_state_is_plain_data_and_a_fresh_monitor_round_trips() -> None:
    fresh = CollapseMonitor(verbose=False)
    assert _checkpointed(fresh).state_dict() == fresh.state_dict()
    assert _checkpointed(fresh).reference_rank is None
