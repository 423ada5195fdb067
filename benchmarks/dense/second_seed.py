"""The dense protocols at 1% of the labels again, with another seed, on the runs of a dense bench.

    python benchmarks/dense/second_seed.py runs/bench_dense --seed 1 [--protocols segmentation,...] [--threads 2]

Seed 1 draws another 1% of the annotated training scenes, other head initialisations and crops, and another
random encoder (the baselines): what the pretrained-vs-baseline margins of the bench's table look like when
nothing but the seed changes. The baselines are measured once per backbone (its first method in the bench's
results), as the bench does. Writes ``<bench>/second_seed.json`` and prints a markdown table. Called again
(after more methods finished, or after it was stopped), it keeps the methods that file already holds for the same
seed, labels and protocols and measures the others (baselines only for a backbone it has none for yet).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from selfsup.eval.evaluate import evaluate_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, help="the --out folder of a `selfsup bench` with dense protocols")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--labels", default="1%")
    parser.add_argument("--protocols", default="segmentation,segmentation_finetune,detection_finetune")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = json.loads((args.bench / "results.json").read_text())
    protocols = [p for p in args.protocols.split(",") if p]
    path = args.bench / "second_seed.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    same = (earlier.get("seed"), earlier.get("labels"), earlier.get("protocols")) == (args.seed, args.labels, protocols)
    rows = earlier["rows"] if same else []
    done = {r["method"] for r in rows}
    seen_backbones = {r["backbone"] for r in rows if r["baselines_measured"]}
    for row in results["rows"]:
        if row.get("family") == "reference" or "error" in row or row["method"] in done:
            continue
        run = args.bench / "runs" / row["method"]
        cfg = (run / "config.yaml").read_text()
        backbone = cfg.split("backbone:", 1)[1].split("data:", 1)[0]
        baselines = backbone not in seen_backbones
        seen_backbones.add(backbone)
        out = {"method": row["method"], "backbone": backbone, "baselines_measured": baselines}
        for protocol in protocols:
            t0 = time.perf_counter()
            (r,) = evaluate_run(run, (protocol,), labels=args.labels, seed=args.seed, baselines=baselines,
                                source=f"benchmarks/dense/second_seed.py (seed {args.seed})")
            out[protocol] = r["score"]
            out[f"{protocol}_baseline"] = next(iter(r["baselines"].values()), None)
            out[f"{protocol}_first_seed"] = row.get(f"{protocol}_{args.labels}")
            out[f"{protocol}_minutes"] = (time.perf_counter() - t0) / 60
            print(f"{row['method']} {protocol}: {100 * r['score']:.1f}%"
                  + (f" (baseline {100 * out[f'{protocol}_baseline']:.1f}%)" if baselines else ""), flush=True)
        rows.append(out)
        path.write_text(json.dumps({"seed": args.seed, "labels": args.labels, "protocols": protocols,
                                    "rows": rows}, indent=2))  # after each method: a stopped call keeps them
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}%"
    print("\n| method | " + " | ".join(f"{p} seed 0 / seed {args.seed}" for p in protocols) + " |")
    print("|---|" + "---|" * len(protocols))
    for r in rows:
        print(f"| {r['method']} | " + " | ".join(f"{pct(r[f'{p}_first_seed'])} / {pct(r[p])}" for p in protocols) + " |")
        if r["baselines_measured"]:
            print(f"| baseline ({r['method']}'s backbone) | "
                  + " | ".join(f"– / {pct(r[f'{p}_baseline'])}" for p in protocols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
