"""Training curves from ``metrics.jsonl``: loss and learning rate, online kNN, collapse diagnostics.

Figures are made with ``matplotlib.figure.Figure`` directly (the Agg canvas, no pyplot), so
nothing here touches the global backend of a program that imports selfsup.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from selfsup.monitor.collapse import CollapseMonitor

WARN_COLOR = "#d62728"


@dataclass
class Metrics:
    """``metrics.jsonl`` split by record type."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    """Logged training steps (loss, lr, images/s, diagnostics)."""
    epochs: list[dict[str, Any]] = field(default_factory=list)
    """Epoch summaries (mean loss, kNN, epoch time)."""
    skipped: list[dict[str, Any]] = field(default_factory=list)
    """Steps skipped for a non-finite loss or gradient."""

    @property
    def warnings(self) -> list[dict[str, Any]]:
        return [r["collapse_warning"] for r in self.steps if "collapse_warning" in r]


def split_metrics(records: list[dict[str, Any]]) -> Metrics:
    m = Metrics()
    for r in records:
        if r.get("skipped"):
            m.skipped.append(r)
        elif "epoch_time_s" in r:
            m.epochs.append(r)
        elif "loss" in r:
            m.steps.append(r)
    return m


def _series(records: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    pts = [(r[x], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Lay out ``fig`` and write it as a PNG (parent folders made); every report picture goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _mark_warnings(ax, m: Metrics) -> None:
    for i, w in enumerate(m.warnings):
        ax.axvline(w["step"], color=WARN_COLOR, lw=1, ls="--", label=f"collapse warning ({w['kind']})" if i == 0 else None)


def plot_loss_lr(m: Metrics, path: Path) -> Path:
    """Training loss (logged steps) and the learning rate against the step."""
    fig = Figure(figsize=(10, 3.2))
    ax_loss, ax_lr = fig.subplots(1, 2)
    x, y = _series(m.steps, "loss")
    if x:
        ax_loss.plot(x, y, lw=1.2, label="loss (logged steps)")
        if m.skipped:
            ax_loss.scatter([r["step"] for r in m.skipped], [min(y)] * len(m.skipped), marker="x", color=WARN_COLOR,
                            label="skipped step (NaN/Inf loss)")
        _mark_warnings(ax_loss, m)
        ax_loss.legend(fontsize=8)
    else:
        _empty(ax_loss, "no logged steps")
    ax_loss.set(title="training loss", xlabel="step")
    x, y = _series(m.steps, "lr")
    if x:
        ax_lr.plot(x, y, lw=1.2, color="tab:orange")
    else:
        _empty(ax_lr, "no logged steps")
    ax_lr.set(title="learning rate (base group)", xlabel="step")
    return save_figure(fig, path)


def plot_knn(m: Metrics, path: Path) -> Path:
    """Online kNN accuracy on the held-out split after each epoch."""
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    x, y = _series(m.epochs, "knn", x="epoch")
    if x:
        ax.plot(x, [100 * v for v in y], marker="o")
        for xi, yi in zip(x, y):
            ax.annotate(f"{100 * yi:.1f}", (xi, 100 * yi), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize=8)
        ax.set_xticks(x)
        # a fixed scale around the values, so a 2-point wobble does not look like a trend
        ax.set_ylim(max(0.0, 100 * min(y) - 10), min(100.0, 100 * max(y) + 5))
    else:
        _empty(ax, "no kNN monitor in this run (train.knn_every = 0, or unlabelled data)")
    ax.set(title="online kNN accuracy (held-out split)", xlabel="epoch", ylabel="%")
    return save_figure(fig, path)


def plot_diagnostics(m: Metrics, path: Path, monitor: CollapseMonitor | None = None) -> Path:
    """Spread against the healthy 1/√D and the warning threshold; effective rank; alignment and uniformity; energy gap."""
    monitor = monitor or CollapseMonitor(verbose=False)
    fig = Figure(figsize=(10, 6.4))
    (a_spread, a_rank), (a_au, a_gap) = fig.subplots(2, 2)
    x, y = _series(m.steps, "spread")
    if not x:
        for ax in (a_spread, a_rank, a_au, a_gap):
            _empty(ax, "this method logs no embeddings (no logs['z'])")
        return save_figure(fig, path)
    _, healthy = _series(m.steps, "spread_healthy")
    a_spread.plot(x, y, label="spread (std of l2-normalised z)")
    a_spread.plot(x, healthy, ls="--", color="tab:green", label="healthy 1/√D")
    a_spread.plot(x, [monitor.spread_fraction * h for h in healthy], ls=":", color=WARN_COLOR,
                  label=f"warning threshold ({monitor.spread_fraction:g}×)")
    a_spread.set_ylim(bottom=0)
    a_spread.set(title="embedding spread", xlabel="step")
    xr, yr = _series(m.steps, "rank")
    a_rank.plot(xr, yr, color="tab:purple", label="effective rank (RankMe)")
    if monitor.rank_drop and yr:  # the relative threshold; the absolute one (a fraction of min(B, D)) is lower
        reference = max(yr[: monitor.reference_checks])
        a_rank.axhline(monitor.rank_drop * reference, ls=":", color=WARN_COLOR,
                       label=f"warning threshold ({monitor.rank_drop:g}× the first checks' {reference:.0f})")
    a_rank.set_ylim(bottom=0)
    a_rank.set(title="effective rank of z", xlabel="step")
    xa, ya = _series(m.steps, "alignment")
    xu, yu = _series(m.steps, "uniformity")
    if xa:
        a_au.plot(xa, ya, label="alignment (lower: positives closer)")
        a_au.plot(xu, yu, label="uniformity (lower: more uniform)")
        a_au.axhline(0, color="0.6", lw=0.8)
        a_au.set(title="alignment and uniformity (Wang & Isola)", xlabel="step")
    else:
        _empty(a_au, "no positive pairs logged (logs['z_pair'])")
    xg, yg = _series(m.steps, "energy_gap")
    if xg:
        a_gap.plot(xg, yg, color="tab:brown", label="cos(positives) − cos(others)")
        a_gap.axhline(0, color="0.6", lw=0.8)
        a_gap.set(title="energy gap", xlabel="step")
    else:
        _empty(a_gap, "no positive pairs logged (logs['z_pair'])")
    for ax in (a_spread, a_rank, a_au, a_gap):
        if ax.lines:
            _mark_warnings(ax, m)
            ax.legend(fontsize=7)
    return save_figure(fig, path)
