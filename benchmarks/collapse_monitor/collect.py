"""Replay run directories' logged diagnostics through the collapse monitor: ``results.json`` and a table.

The monitor is a function of the logged (step, spread, rank) sequence and the shape of z, so replaying
``metrics.jsonl`` gives exactly the warnings the training loop would have printed with the monitor's
current settings (or with other ones, to choose them):

    python benchmarks/collapse_monitor/collect.py RUN_DIR [RUN_DIR ...] --json benchmarks/collapse_monitor/results.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from selfsup.monitor.collapse import CollapseMonitor
from selfsup.report.curves import split_metrics
from selfsup.train.rundir import read_metrics


def replay(run_dir: Path, **settings: Any) -> dict[str, Any]:
    """Per-run figures: D, B, the reference rank (first logged checks), min and last rank, the lowest
    rank / reference ratio, and the warnings of a fresh monitor (``settings`` override its defaults)."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    steps = [r for r in split_metrics(read_metrics(run_dir)).steps if r.get("rank") is not None]
    if not steps:
        return {"run": run_dir.name, "error": "no logged embeddings"}
    dim = round(1 / steps[0]["spread_healthy"] ** 2)
    batch = int(cfg["train"]["batch_size"])
    monitor = CollapseMonitor(verbose=False, **settings)
    shape = torch.empty(batch, dim)
    fired = [w for r in steps if (w := monitor.update(r["step"], r, shape).get("collapse_warning"))]
    ranks = [r["rank"] for r in steps]
    ref = monitor.reference_rank
    spread_ratio = [r["spread"] / r["spread_healthy"] for r in steps]
    return {"run": run_dir.name, "method": cfg["method"]["name"], "D": dim, "B": batch, "logged_checks": len(steps),
            "last_step": steps[-1]["step"], "reference_rank": ref, "first_ranks": ranks[: monitor.reference_checks],
            "min_rank": min(ranks), "min_rank_step": steps[ranks.index(min(ranks))]["step"], "last_rank": ranks[-1],
            "min_rank_over_reference": min(ranks) / ref if ref else None,
            "min_rank_over_min_bd": min(ranks) / min(batch, dim), "min_spread_over_healthy": min(spread_ratio),
            "warnings": [{"kind": w["kind"], "step": w["step"], "rank": round(w["rank"], 2),
                          "rank_threshold": round(w["rank_threshold"], 2)} for w in fired]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--rank-drop", type=float, help="override CollapseMonitor.rank_drop")
    args = parser.parse_args(argv)
    settings = {} if args.rank_drop is None else {"rank_drop": args.rank_drop}
    rows = [replay(r, **settings) for r in args.runs]
    print("| run | D | min(B, D) | reference rank | min rank (step) | last rank | min / reference | min / min(B, D) | warnings |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['run']} | – | – | – | – | – | – | – | {r['error']} |")
            continue
        warn = ", ".join(f"{w['kind']} at step {w['step']}" for w in r["warnings"]) or "none"
        print(f"| {r['run']} | {r['D']} | {min(r['B'], r['D'])} | {r['reference_rank']:.1f} | {r['min_rank']:.1f} "
              f"({r['min_rank_step']}) | {r['last_rank']:.1f} | {r['min_rank_over_reference']:.2f} | "
              f"{r['min_rank_over_min_bd']:.3f} | {warn} |")
    if args.json:
        args.json.write_text(json.dumps({"settings": settings or "defaults", "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
