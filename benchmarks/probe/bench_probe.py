"""The linear probe's cost: its objective written out (``selfsup.eval.linear.logistic_objective``: classes padded
to 16, a row-blocked batched GEMM) against autograd through ``F.cross_entropy(F.linear(...))``, the way the probe
computed it before.

1. One evaluation of loss and gradients on standardised Gaussian features, (54,000 × 2,048) and (54,000 × 784),
   the two implementations alternating; medians over repeats.
2. With ``--features FILE`` (a ``torch.save`` of {"tr", "te", "ytr", "yte"}: train/test features and labels), the
   whole ``linear_probe`` with each objective, alternating: wall time, accuracy and chosen L2 strength.

    python benchmarks/probe/bench_probe.py [--threads 2] [--repeats 7] [--features feats.pt] [--rounds 2]

Say which CPU ran it (``lscpu``: avx512_bf16 or AVX2 only); to emulate an AVX2-only CPU on an AVX-512 one, set
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import selfsup.eval.linear as linear


def autograd_objective(x, y, w, b, l2):
    """The previous way: autograd through F.linear and F.cross_entropy."""
    w, b = w.detach().requires_grad_(True), b.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(F.linear(x, w, b), y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
    return loss.detach(), w.grad, b.grad


WRITTEN_OUT = linear.logistic_objective
OBJECTIVES = {"autograd": autograd_objective, "written_out": WRITTEN_OUT}


def time_objectives(n: int, d: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    w, b = 0.01 * torch.randn(10, d, generator=g), 0.1 * torch.randn(10, generator=g)
    times = {k: [] for k in OBJECTIVES}
    for _ in range(repeats):
        for name, f in OBJECTIVES.items():
            t = time.perf_counter()
            f(x, y, w, b, 1e-3)
            times[name].append(time.perf_counter() - t)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {"n": n, "d": d, **{f"{k}_ms": round(v, 1) for k, v in ms.items()},
            "speedup": round(ms["autograd"] / ms["written_out"], 2)}


def time_probes(path: str, rounds: int) -> list[dict]:
    f = torch.load(path, weights_only=True)
    rows = []
    for r in range(rounds):
        for name, objective in OBJECTIVES.items():
            linear.logistic_objective = objective
            t = time.perf_counter()
            out = linear.linear_probe(f["tr"], f["ytr"], f["te"], f["yte"], int(f["ytr"].max()) + 1)
            rows.append({"round": r, "objective": name, "wall_s": round(time.perf_counter() - t, 1),
                         "accuracy": round(100 * out["accuracy"], 2), "l2": out["l2"]})
            print(rows[-1], flush=True)
    linear.logistic_objective = WRITTEN_OUT
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--features", help="saved features for whole probes")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", help="write the figures as JSON here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    result = {"threads": a.threads, "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "objective": [time_objectives(54000, d, a.repeats) for d in (2048, 784)]}
    for row in result["objective"]:
        print(row, flush=True)
    if a.features:
        result["probe"] = time_probes(a.features, a.rounds)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
