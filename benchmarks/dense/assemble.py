"""Rebuild a bench's ``results.{json,md,png}`` from the per-method rows of one or more ``selfsup bench`` folders.

    python benchmarks/dense/assemble.py runs/bench_dense runs/bench_dense_b --out runs/bench_dense_all \\
        --methods simclr,mocov2,densecl,vicreg,vicregl,byol --data fashion-mnist-scenes \\
        --protocols segmentation,segmentation_finetune,detection_finetune --threads 2

For a bench whose call ended before its last method (a session that stopped, a killed job): every method
that finished left ``<folder>/runs/<method>.json``, and a second bench (``--no-baseline``: the first folder's
first method measured the baselines) ran the rest. Rows are taken from the first folder that has them,
rows with an error are skipped, and ``<out>/runs/<method>`` links to the run directory each came from (what
``second_seed.py`` reads). The settings given here describe the table: give those the benches ran with.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from selfsup.bench import DENSE_LABELS, finished_row, write_results
from selfsup.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="`selfsup bench --out` folders, first one first")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", required=True, help="comma-separated, in table order")
    parser.add_argument("--data", required=True)
    parser.add_argument("--protocols", default="segmentation,segmentation_finetune,detection_finetune")
    parser.add_argument("--dense-labels", default=",".join(DENSE_LABELS))
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    rows, backbones, missing = [], [], []
    for m in (m.strip() for m in args.methods.split(",") if m.strip()):
        found = next(((f, row) for f in args.folders if (row := finished_row(f / "runs" / f"{m}.json"))), None)
        if found is None:
            missing.append(m)
            continue
        found, row = found
        row["bench_folder"] = str(found)
        rows.append(row)
        backbones.append(load_config(row["recipe"], {"data.name": args.data}).backbone)
        link = args.out / "runs" / m
        if not link.exists() and (found / "runs" / m).resolve() != link.resolve():
            link.symlink_to((found / "runs" / m).resolve(), target_is_directory=True)
    if not any("baselines" in r for r in rows):
        print("note: no row holds the baselines (the first method's bench ran with --no-baseline?): "
              "no reference rows", file=sys.stderr)
    dense = [p for p in args.protocols.split(",") if p and p not in ("knn", "linear")]
    settings = {"budget": {}, "budget_text": "each recipe's epochs on all training images, each recipe's batch size",
                "data": args.data, "finetune": [], "dense": dense,
                "dense_labels": [f for f in args.dense_labels.split(",") if f], "dense_steps": None,
                "finetune_steps": None, "eval_limit": None, "torch": torch.__version__,
                "platform": platform.platform(), "threads": args.threads,
                "settings": {}, "assembled_from": [str(f) for f in args.folders], "missing": missing}
    write_results(args.out, settings, rows, backbones)
    print(f"{len(rows)} method(s) in {args.out / 'results.md'}" + (f"; no finished row for {', '.join(missing)}"
                                                                   if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
