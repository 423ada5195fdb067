"""The run's own warnings, repeated where its encoder is used (``selfsup neighbors``, the report's retrieval section).

Training says at its start when a run is too short to learn (fewer steps than the method's ``MethodSpec.min_steps``)
and during it when the embeddings collapse (``collapse_warning`` records in ``metrics.jsonl``); both scroll away
with the training log. Neighbours and near-duplicate groups of such an encoder can be no better than a random
encoder's — a 36-step run grouped 491 unrelated clip-art images as "near-duplicates" — so whatever uses the
encoder says it again, in one line, from what the run directory holds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: the rest still tells the story
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _min_steps(method: str) -> int | None:
    from selfsup.methods import get_method
    from selfsup.config import ConfigError

    try:
        return get_method(method).spec.min_steps
    except ConfigError:  # a method this install does not know: nothing to compare with
        return None


def _cfg(run_dir: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _collapse_text(warning: dict[str, Any], last_step: dict[str, Any] | None) -> str:
    text = (f"it logged a {warning.get('kind', '?')}-collapse warning at step {warning.get('step', '?')} "
            f"(spread {warning.get('spread', float('nan')):.4f}, effective rank {warning.get('rank', float('nan')):.1f})")
    if last_step is not None and last_step.get("step", -1) > warning.get("step", 0):
        spread, rank = last_step.get("spread"), last_step.get("rank")
        recovered = (spread is not None and rank is not None and spread >= warning.get("spread_threshold", 0)
                     and rank >= warning.get("rank_threshold", 0))
        text += f", {'recovered' if recovered else 'not recovered'} by its last logged step {last_step['step']}"
    return text


def run_warning(run_dir: str | Path) -> str | None:
    """One line saying why the run's encoder may not be trusted, or None: trained fewer steps than the method's
    ``min_steps`` (not said of a backbone initialised from weights, which may not need them), and/or a collapse
    warning logged (the last one, and whether the figures recovered by the end)."""
    run_dir = Path(run_dir)
    cfg = _cfg(run_dir)
    records = _records(run_dir)
    method = (cfg.get("method") or {}).get("name")
    reasons = []
    steps = max((r["step"] for r in records if isinstance(r.get("step"), int)), default=None)
    min_steps = _min_steps(method) if isinstance(method, str) else None
    from_weights = bool((cfg.get("backbone") or {}).get("weights"))
    if steps is not None and min_steps is not None and steps < min_steps and not from_weights:
        reasons.append(f"{method} trained only {steps} steps, fewer than the ~{min_steps} it needs to learn beyond a "
                       "random encoder (MethodSpec.min_steps)")
    warnings = [r["collapse_warning"] for r in records if isinstance(r.get("collapse_warning"), dict)]
    if warnings:
        logged = [r for r in records if "spread" in r and "epoch_time_s" not in r]
        reasons.append(_collapse_text(warnings[-1], logged[-1] if logged else None))
    if not reasons:
        return None
    return (f"warning: the encoder of {run_dir} may be weak: {'; '.join(reasons)}. Its neighbours and near-duplicate "
            "groups may be no better than a random encoder's; train longer for trustworthy ones.")
