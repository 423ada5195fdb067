"""What one recipe costs per image, beside the old default, on this CPU natively and in AVX2-emulated fp32.

Each row is a recipe (a config file plus ``KEY=VALUE`` overrides), built by the real set-up
(:func:`selfsup.train.setup.setup_run`) and stepped by the real :func:`selfsup.train.loop.train_step`
(views, forward, backward, optimiser, teachers) on Fashion-MNIST batches. Every (row, mode, round) runs in
its own subprocess; rows alternate within a round, so a noisy neighbour slows every row of that round alike.
Printed per mode: the median images/s over rounds, and the median over rounds of the row's time per image over the
first row's time per image in the same round (the paired ratio: the firm figure on a shared machine), and the
training FLOPs per image counted by ``torch.utils.flop_counter`` (forward + backward of one step).

On a machine shared with other jobs, wall time swings by 2× from minute to minute; run with ``--threads 1``
and read the CPU-time columns (``time.process_time`` of the step: what the step costs one core, whoever else
runs), which is what the ratios use. With one thread CPU time is close to the wall time of a quiet core.

Modes:
- ``native``: ``precision: auto`` on this CPU (bf16 autocast where the CPU has AVX-512 BF16);
- ``avx2-fp32``: fp32, with aten's kernels limited to AVX2 (``ATEN_CPU_CAPABILITY=avx2``), oneDNN's to AVX2
  (``ONEDNN_MAX_CPU_ISA=AVX2``) and MKL's to AVX2 (``MKL_ENABLE_INSTRUCTIONS=AVX2``): an approximation of the
  AVX2-only EPYC (same clock and cores as this one; that machine's own fp32 matmul peak is ~115 GFLOP/s).

    python benchmarks/recipe_screen/cost.py --rounds 3 \\
        --row old=configs/simclr_fashion_mnist.yaml \\
        --row new=configs/essl_fashion_mnist.yaml \\
        --row narrow=configs/simclr_fashion_mnist.yaml:backbone.params.widths=[32,64,128,256]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "native": ({}, "auto"),
    "avx2-fp32": ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
                  "fp32"),
}


def parse_row(text: str) -> tuple[str, str, dict]:
    """``NAME=CONFIG[:KEY=VALUE[:KEY=VALUE…]]`` → (name, config path, overrides)."""
    from selfsup.config import parse_override

    name, _, rest = text.partition("=")
    config, *sets = rest.split(":")
    return name, config, dict(parse_override(s) for s in sets)


def run_one(config: str, overrides: dict, precision: str, steps: int, warmup: int, threads: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from selfsup.config import load_config
    from selfsup.methods.base import make_progress
    from selfsup.train.loop import train_step
    from selfsup.train.setup import setup_run

    batch = load_config(config, overrides).train.batch_size
    n = batch * (steps + warmup + 2)
    cfg = load_config(config, {**overrides, "data.limit": n + n // 9 + 1, "data.val_size": n // 9 + 1,
                               "train.precision": precision, "train.threads": threads, "train.knn_every": 0,
                               "train.progress": False, "train.epochs": 1})
    with tempfile.TemporaryDirectory() as tmp:
        run = setup_run(cfg, Path(tmp) / "run")
        order = torch.randperm(len(run.data.train))
        batches = [run.data.train.batch(order[i * batch:(i + 1) * batch]) for i in range(steps + warmup + 1)]

        def step(i: int) -> None:
            progress = make_progress(run.model, i, run.total_steps, 0, run.steps_per_epoch)
            result = train_step(run, batches[i], order[i * batch:(i + 1) * batch], progress)
            float(result.loss)

        for i in range(warmup):
            step(i)
        times, cpu_times = [], []
        for i in range(warmup, warmup + steps):
            t0, c0 = time.perf_counter(), time.process_time()
            step(i)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        counter = FlopCounterMode(display=False)
        with counter:
            step(warmup + steps)
    step_s = statistics.median(times)
    cpu_s = statistics.median(cpu_times)
    return {"step_s": step_s, "images_per_s": batch / step_s, "cpu_s": cpu_s, "cpu_images_per_s": batch / cpu_s, "flops_per_image": counter.get_total_flops() / batch,
            "batch": batch, "precision": str(run.amp_dtype or "fp32"), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def measure(row_text: str, mode: str, steps: int, warmup: int, threads: int, tree: Path | None = None,
            label: str = "") -> dict:
    """One (row, mode) measurement in its own subprocess. With ``tree`` (a checkout): that checkout's ``cost.py``
    on its own code, run from its root, so another version of the code is measured beside this one (``code_ab.py``)."""
    env_extra, precision = MODES[mode]
    env = {**os.environ, **env_extra}
    if tree is None:
        script = __file__
    else:
        script, env["PYTHONPATH"] = str(tree / "benchmarks" / "recipe_screen" / "cost.py"), str(tree)
    cmd = [sys.executable, script, "--row", row_text, "--one", precision, "--steps", str(steps), "--warmup", str(warmup),
           "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{label or row_text} ({mode}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", action="append", required=True, help="NAME=CONFIG[:KEY=VALUE…]; the first is the reference")
    p.add_argument("--modes", default="native,avx2-fp32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="append one JSON line per measurement here")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        name, config, overrides = parse_row(a.row[0])
        print(json.dumps(run_one(config, overrides, a.one, a.steps, a.warmup, a.threads)))
        return
    rows = [parse_row(r) for r in a.row]
    results: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(a.rounds):
        for mode in a.modes.split(","):
            for row_text, (name, _, _) in zip(a.row, rows):
                r = {"name": name, "mode": mode, "round": rnd,
                     **measure(row_text, mode, a.steps, a.warmup, a.threads, label=name)}
                results.setdefault((name, mode), []).append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
                if a.out:
                    with open(a.out, "a") as f:
                        f.write(json.dumps(r) + "\n")
    ref = rows[0][0]
    print(f"{'row':<16}{'mode':<11}{'wall img/s':>11}{'CPU img/s':>10}{'CPU s/image × ' + ref:>20}"
          f"{'GFLOP/image':>13}  precision/ISA")
    for mode in a.modes.split(","):
        for name, _, _ in rows:
            rs = results[(name, mode)]
            ratio = statistics.median((r["cpu_s"] / r["batch"]) / (q["cpu_s"] / q["batch"])
                                      for r, q in zip(rs, results[(ref, mode)]))
            print(f"{name:<16}{mode:<11}{statistics.median(r['images_per_s'] for r in rs):>11.0f}"
                  f"{statistics.median(r['cpu_images_per_s'] for r in rs):>10.0f}{ratio:>20.2f}"
                  f"{rs[0]['flops_per_image'] / 1e9:>13.3f}  {rs[0]['precision']}/{rs[0]['cpu_capability']}")


if __name__ == "__main__":
    main()
