"""Collapse warnings: watch spread and effective rank during training and say clearly when they fail.

Two failures look different in the diagnostics (``selfsup.monitor.diagnostics``):

- complete collapse — every input maps to (nearly) one point: the spread of the l2-normalised
  embeddings falls towards 0 instead of staying near 1/√D (SimSiam without stop-gradient, Chen & He
  2020, arXiv:2011.10566, fig. 2);
- dimensional collapse — the embeddings fill only a few directions: the spread can stay near
  healthy while the effective rank (RankMe, arXiv:2210.02885) falls far below D (Jing et al. 2021,
  arXiv:2110.09348).

Dimensional collapse is judged against the run itself as well as against D: the rank a network
can reach depends on the method, head and data (a healthy run of one recipe sits where a collapsed
run of another does), so the monitor also remembers the highest rank of the run's first
``reference_checks`` logged checks and warns when the rank falls below ``rank_drop`` × that. A run
whose first checks are below or near the absolute bar (under twice it: a ViT at initialisation; I-JEPA's,
iBOT's and DINOv2's recipes start at rank 5–8 of 128–192) is not warned for staying there, only for
falling from it.

A figure below its threshold on one logged step is noise (early training, one odd batch); the
monitor warns only after ``window`` logged checks in a row, once per episode, and re-arms when the
figures recover.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from selfsup import distributed as dist

log = logging.getLogger("selfsup")

CAUSES = {
    "complete": (
        "every image is mapped to nearly the same embedding. Usual causes: a missing stop-gradient or "
        "predictor (SimSiam, BYOL), an EMA teacher that follows the student too closely (momentum too low), "
        "DINO-style centering and sharpening out of balance (teacher temperature), a learning rate too high, "
        "or a loss with nothing that keeps different images apart (no negatives, no variance term)."
    ),
    "dimensional": (
        "the embeddings use only a few directions of the space. Usual causes: augmentations too strong for "
        "the projector (Jing et al. 2021, arXiv:2110.09348), too weak a variance/covariance term (VICReg, "
        "Barlow Twins), a temperature far from the recipe's (too small sharpens onto a few directions), "
        "or a learning rate or weight decay too high. A rank still falling towards 1 is complete collapse on its "
        "way (a missing stop-gradient or predictor, a teacher momentum too low)."
    ),
}


@dataclass
class CollapseMonitor:
    """Feed it each logged step's diagnostics; it returns ``{"collapse_warning": {...}}`` when a warning fires.

    Thresholds: spread < ``spread_fraction`` × 1/√D (complete collapse); effective rank below
    max(``min_rank``, ``rank_fraction`` × min(B, D)) (unless the run's reference rank is below twice that), or below
    ``rank_drop`` × the reference rank (dimensional collapse). The reference is the highest rank among the first
    ``reference_checks`` finite logged checks (while fewer have been seen, the highest so far); it
    is saved in the run's checkpoints (:meth:`state_dict`), so a resumed run keeps the reference of its start.

    Measured on Fashion-MNIST: the default SimCLR recipe sits at 0.84–0.97 × 1/√D and rank 0.27–0.65 ×
    min(B, D) over its first epochs. SimSiam's recipe (4 epochs on 16,384 images, D = 512) without
    stop-gradient falls from rank 57 at step 20 to 13–18 (0.23–0.32 × its reference) while its spread
    stays at 0.9 × 1/√D — above the absolute rank threshold 0.05 × 256 = 12.8; with stop-gradient it
    goes from 146 to 92–97 (≥ 0.63 ×). Every Fashion-MNIST recipe's ratio and the choice of
    ``rank_drop``: ``benchmarks/collapse_monitor/``.
    """

    spread_fraction: float = 0.25
    rank_fraction: float = 0.05
    min_rank: float = 1.5
    rank_drop: float = 0.35
    reference_checks: int = 3
    window: int = 3
    verbose: bool = True
    stops: bool = False
    """The run stops on a warning (``train.stop_on_collapse``); only changes the message's last sentence."""
    warnings: list[dict[str, Any]] = field(default_factory=list)
    _low: dict[str, int] = field(default_factory=lambda: {"complete": 0, "dimensional": 0})
    _first_low: dict[str, int] = field(default_factory=dict)
    _fired: set[str] = field(default_factory=set)
    _reference: list[float] = field(default_factory=list)
    _device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if not 0 < self.spread_fraction < 1:
            raise ValueError(f"spread_fraction must be in (0, 1), got {self.spread_fraction}")
        if not 0 <= self.rank_fraction < 1:
            raise ValueError(f"rank_fraction must be in [0, 1), got {self.rank_fraction}")
        if not 0 <= self.rank_drop < 1:
            raise ValueError(f"rank_drop must be in [0, 1) (0 disables the relative rank check), got {self.rank_drop}")
        if self.reference_checks < 1:
            raise ValueError(f"reference_checks must be ≥ 1, got {self.reference_checks}")
        if self.window < 1:
            raise ValueError(f"window must be ≥ 1, got {self.window}")

    def thresholds(self, batch: int, dim: int) -> tuple[float, float]:
        """(spread threshold, rank threshold) for (batch, dim) embeddings: the absolute one, or the one
        relative to the run's reference rank once a check has been seen, whichever is higher."""
        rank_min = max(self.min_rank, self.rank_fraction * min(batch, dim))
        if self._reference:
            reference = max(self._reference)
            # a run that starts below or near the absolute bar (a random ViT's tokens span ~6 of 192 directions)
            # is judged by whether its rank falls from where it began, not by a bar it never cleared by much
            absolute = rank_min if reference >= 2 * rank_min else self.min_rank
            rank_min = max(absolute, self.rank_drop * reference)
        return self.spread_fraction / dim ** 0.5, rank_min

    @property
    def reference_rank(self) -> float | None:
        """The highest rank of the first ``reference_checks`` finite checks (None before the first)."""
        return max(self._reference) if self._reference else None

    def update(self, step: int, diagnostics: dict[str, float], z: Tensor) -> dict[str, Any]:
        """Check one logged step; ``z`` (B, D) is the batch the diagnostics came from (for its shape)."""
        batch, dim = int(z.shape[0]), int(z.shape[1])
        self._device = z.device
        spread, rank = diagnostics.get("spread", float("nan")), diagnostics.get("rank", float("nan"))
        if spread != spread and rank != rank:
            return {}  # a non-finite batch neither starts nor breaks a streak
        if rank == rank and len(self._reference) < self.reference_checks:
            self._reference.append(rank)
        spread_min, rank_min = self.thresholds(batch, dim)
        # complete collapse also has a low rank; it is reported once, as complete
        low = {"complete": spread < spread_min, "dimensional": rank < rank_min and not spread < spread_min}
        out: dict[str, Any] = {}
        for kind, is_low in low.items():
            if not is_low:
                self._low[kind] = 0
                self._fired.discard(kind)  # recovered: a later episode warns again
                continue
            if self._low[kind] == 0:
                self._first_low[kind] = step
            self._low[kind] += 1
            if self._low[kind] >= self.window and kind not in self._fired:
                self._fired.add(kind)
                warning = {"kind": kind, "step": step, "since_step": self._first_low[kind], "checks": self._low[kind],
                           "spread": spread, "spread_healthy": 1 / dim ** 0.5, "spread_threshold": spread_min,
                           "rank": rank, "rank_threshold": rank_min, "max_rank": min(batch, dim),
                           "reference_rank": self.reference_rank, "rank_drop": self.rank_drop,
                           "energy_gap": diagnostics.get("energy_gap")}
                warning["message"] = format_warning(warning, self.stops)
                self.warnings.append(warning)
                if self.verbose:
                    log.warning("%s", warning["message"])
                out["collapse_warning"] = warning
        return out

    @property
    def collapsed(self) -> bool:
        """True while a warning's episode lasts (the figures have not recovered since it fired)."""
        return bool(self._fired)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to warn exactly as the uninterrupted one would: the reference ranks (learnt
        again after a resume, they would be the ranks of a run that may already have collapsed, which then never
        warns), the low checks in a row and the episodes already warned about (neither lost nor repeated), and
        the warnings themselves. Plain numbers, strings and lists only: ``torch.load(weights_only=True)`` reads it."""
        return {"reference": list(self._reference), "low": dict(self._low), "first_low": dict(self._first_low),
                "fired": sorted(self._fired), "warnings": [dict(w) for w in self.warnings]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`; the thresholds stay this monitor's own (they come from the code
        and the config, which a resumed run shares with the saved one)."""
        self._reference = [float(r) for r in state["reference"]]
        self._low = {"complete": 0, "dimensional": 0, **{k: int(v) for k, v in state["low"].items()}}
        self._first_low = {k: int(v) for k, v in state["first_low"].items()}
        self._fired = set(state["fired"])
        self.warnings = [dict(w) for w in state["warnings"]]

    def should_stop(self) -> bool:
        """Collapsed here, or on any process of a distributed run (so every rank stops at the same step)."""
        if dist.world_size() == 1:
            return self.collapsed
        flag = dist.all_reduce_mean(torch.tensor([float(self.collapsed)], device=self._device))
        return bool(flag.item() > 0)

    def stop_message(self) -> str:
        last = self.warnings[-1] if self.warnings else None
        what = f"{last['kind']} collapse (spread {last['spread']:.4f}, rank {last['rank']:.1f})" if last else "collapse"
        return f"{what}; train.stop_on_collapse is set, so the run stopped here"


def format_warning(w: dict[str, Any], stops: bool = False) -> str:
    """The message a person reads: what, the figures against their thresholds, since when, and why it happens."""
    return (f"COLLAPSE WARNING ({w['kind']} collapse) at step {w['step']}: spread {w['spread']:.4f} "
            f"(healthy ≈ {w['spread_healthy']:.4f} = 1/√D, warns below {w['spread_threshold']:.4f}), "
            f"effective rank {w['rank']:.1f} of at most {w['max_rank']} (warns below {w['rank_threshold']:.1f}"
            + (f": {w['rank_drop']:g} × the {w['reference_rank']:.1f} this run reached in its first logged checks"
               if w.get("reference_rank") and w["rank_threshold"] == w["rank_drop"] * w["reference_rank"] else "")
            + "), "
            f"for {w['checks']} logged checks in a row since step {w['since_step']}"
            + (f"; energy gap {w['energy_gap']:.3f} (cos of positive pairs minus cos of other pairs)"
               if w.get("energy_gap") is not None else "") + ". "
            f"This means {CAUSES[w['kind']]} "
            + ("The run stops here (train.stop_on_collapse)." if stops
               else "Set train.stop_on_collapse: true to stop such runs automatically."))
