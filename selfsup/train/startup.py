"""How long a run took to start training: from the process's start to the end of its first optimiser step.

The figure (``env.json``'s ``startup``) is what a user waits for before anything trains, split into the parts
that can dominate it: the interpreter and imports (everything before :func:`~selfsup.train.setup.setup_run`),
the data (listing or checking the image folder's cache, opening it, the normalisation statistics), the model
(building and checking it) and the first step itself (the first batch read, views, forward and backward).
Wall seconds say what the user waited on this machine; the process's CPU seconds are the figure to compare
between machines of different load (a shared machine stretches wall time, not CPU time).
"""
from __future__ import annotations

import os
import resource
import time
from contextlib import contextmanager
from typing import Any, Iterator


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``, 10 ms resolution), or None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        # field 22 (starttime, clock ticks after boot); the command name before it may hold spaces
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (every thread; not child processes)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class StartupClock:
    """Started when a run's set-up begins; :meth:`part` times the set-up's parts, :meth:`first_step` the rest.
    Each part is timed in wall and in CPU seconds."""

    def __init__(self) -> None:
        self.before_setup_s = process_age()
        """Interpreter start, imports, config and process-group set-up; None where the process age is unknown."""
        self.before_setup_cpu_s = cpu_seconds()
        self.t0 = time.perf_counter()
        self.parts: dict[str, list[float]] = {}
        self.setup_end: tuple[float, float] | None = None
        self.done = False

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        t, c = time.perf_counter(), cpu_seconds()
        try:
            yield
        finally:
            wall, cpu = self.parts.setdefault(name, [0.0, 0.0])
            self.parts[name] = [wall + time.perf_counter() - t, cpu + cpu_seconds() - c]

    def setup_done(self) -> None:
        self.setup_end = (time.perf_counter(), cpu_seconds())

    def first_step(self) -> dict[str, Any]:
        """The figures at the end of the first step (call once): seconds from the process start (or from the
        set-up when the process start is unknown) and the process's CPU seconds, in total and per part
        (``imports``, the set-up's parts, the rest of the set-up, the first step)."""
        self.done = True
        now, cpu_now = time.perf_counter(), cpu_seconds()
        setup_end, setup_end_cpu = self.setup_end or (now, cpu_now)
        wall: dict[str, float] = {}
        cpu: dict[str, float] = {}
        if self.before_setup_s is not None:
            wall["imports"], cpu["imports"] = self.before_setup_s, self.before_setup_cpu_s
        for name, (w, c) in self.parts.items():
            wall[name], cpu[name] = w, c
        wall["other_setup"] = setup_end - self.t0 - sum(w for w, _ in self.parts.values())
        cpu["other_setup"] = setup_end_cpu - self.before_setup_cpu_s - sum(c for _, c in self.parts.values())
        wall["first_step"], cpu["first_step"] = now - setup_end, cpu_now - setup_end_cpu
        return {"first_step_s": round(now - self.t0 + (self.before_setup_s or 0.0), 3),
                "first_step_cpu_s": round(cpu_now, 3),
                "from": "process start" if self.before_setup_s is not None else "set-up start",
                "parts_s": {k: round(v, 3) for k, v in wall.items()},
                "parts_cpu_s": {k: round(max(v, 0.0), 3) for k, v in cpu.items()}}
