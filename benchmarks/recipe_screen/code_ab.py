"""One recipe's training step under two versions of the code, side by side (``cost.py`` compares recipes within one).

Each round runs ``cost.py --one`` (:func:`cost.measure`: the real set-up and :func:`selfsup.train.loop.train_step` on Fashion-MNIST
batches) once per tree and mode in its own subprocess, the tree first on ``PYTHONPATH``, alternating, so machine
noise hits both. Printed per mode: median images/s per tree and the median over rounds of the paired ratio of CPU
time per step (base / new: > 1 means the new tree is faster). Make the base tree with ``git worktree add``:

    git worktree add /tmp/base HEAD
    python benchmarks/recipe_screen/code_ab.py --base /tmp/base --new . --config configs/vicreg_fashion_mnist.yaml
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from cost import measure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="checkout of the reference code")
    p.add_argument("--new", required=True, help="checkout of the changed code")
    p.add_argument("--config", default="configs/essl_fashion_mnist.yaml")
    p.add_argument("--modes", default="native,avx2-fp32")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args()
    trees = {"base": Path(a.base).resolve(), "new": Path(a.new).resolve()}
    results: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(a.rounds):
        for mode in a.modes.split(","):
            for name, tree in trees.items():
                r = measure(f"r={a.config}", mode, a.steps, a.warmup, a.threads, tree=tree, label=name)
                results.setdefault((mode, name), []).append(r)
                print(f"round {rnd} {mode:<10} {name:<5} {r['images_per_s']:7.0f} img/s", file=sys.stderr, flush=True)
    for mode in a.modes.split(","):
        base, new = results[(mode, "base")], results[(mode, "new")]
        ratio = statistics.median(b["cpu_s"] / n["cpu_s"] for b, n in zip(base, new))
        print(f"{mode:<10} base {statistics.median(r['images_per_s'] for r in base):6.0f} img/s  "
              f"new {statistics.median(r['images_per_s'] for r in new):6.0f} img/s  paired CPU-time speed-up {ratio:.2f}x")


if __name__ == "__main__":
    main()
