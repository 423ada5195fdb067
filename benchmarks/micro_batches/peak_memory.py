"""Peak memory of a SimCLR training step, whole batches against micro-batches (``train.micro_batch_size``).

The default recipe's small CNN (``small_resnet`` [32, 64, 128, 512], stem stride 2, 28×28 one-channel images,
the SimCLR recipe's 512 → 128 projector, LARS), channels-last fp32 as the CPU loop runs it. Each setting runs in a
fresh subprocess, so its peak is its own: on the CPU the process's maximum resident set (``resource.getrusage``;
``tracemalloc`` does not see torch's allocations), on CUDA ``torch.cuda.max_memory_allocated``. A setting is
``B`` (the whole batch at once) or ``B/m`` (B in micro-batches of m: GradCache, ``selfsup.train.micro``).

    OMP_NUM_THREADS=1 python benchmarks/micro_batches/peak_memory.py [--settings 256,1024,4096,4096/256]
        [--steps 2] [--device cpu|cuda] [--out results.json]

Prints one row per setting: peak, the set-up's share of it (model, optimiser, images: the peak before the first
step), the step's own (the difference), and seconds per step.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

MODEL = {"backbone": "small_resnet", "params": {"widths": [32, 64, 128, 512], "stem_stride": 2}, "size": 28,
         "head": {"proj_hidden": 512, "proj_dim": 128, "temperature": 0.2}}


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(batch: int, micro: int | None, steps: int, device: torch.device) -> dict:
    """The measurement, in this (fresh) process."""
    from selfsup.methods.base import make_progress
    from selfsup.methods.simclr import SimCLR
    from selfsup.nn.backbones import build_backbone
    from selfsup.train.micro import accumulate
    from selfsup.train.optim import LARS
    from selfsup.views import Augment, ViewRecipe, make_views, resolve_sizes

    torch.manual_seed(0)
    size = MODEL["size"]
    model = SimCLR(build_backbone(MODEL["backbone"], 1, size, **MODEL["params"]), **MODEL["head"]).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = LARS(model.parameters(), lr=0.1, weight_decay=1e-6)
    recipe = resolve_sizes(ViewRecipe(globals_=(Augment(scale=(0.4, 1.0), blur_p=0.0),) * 2), size)
    images = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = _peak_mib(device)
    times, losses = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        with torch.no_grad():
            views = [v.contiguous(memory_format=torch.channels_last)
                     for v in make_views(images, recipe, [0.5], [0.25])]
        progress = make_progress(model, step, 100, 0, 100)
        opt.zero_grad(set_to_none=True)
        if micro:
            loss, _ = accumulate(model, views, progress, {}, micro)
        else:
            loss, _ = model.training_step(views, progress)
            loss.backward()
        opt.step()
        del views
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    peak = _peak_mib(device)
    return {"batch": batch, "micro": micro, "peak_mib": round(peak, 1), "setup_mib": round(before, 1),
            "step_mib": round(peak - before, 1), "step_s": [round(t, 2) for t in times], "loss": losses,
            "threads": torch.get_num_threads(), "device": str(device), "torch": torch.__version__}


def parse(setting: str) -> tuple[int, int | None]:
    batch, _, micro = setting.partition("/")
    return int(batch), int(micro) if micro else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="256,1024,4096,4096/256")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        batch, micro = parse(args.child)
        print(json.dumps(child(batch, micro, args.steps, torch.device(args.device))))
        return
    rows = []
    print("| setting | peak MiB | set-up MiB | step MiB | s / step | loss (step 1) |")
    print("|---|---|---|---|---|---|")
    for setting in args.settings.split(","):
        done = subprocess.run([sys.executable, __file__, "--child", setting, "--steps", str(args.steps),
                               "--device", args.device], capture_output=True, text=True)
        if done.returncode != 0:  # e.g. out of memory: say so and go on
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"| {setting} | failed: {tail} | | | | |", flush=True)
            rows.append({"setting": setting, "failed": tail, "returncode": done.returncode})
            continue
        row = {"setting": setting, **json.loads(done.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(f"| {setting} | {row['peak_mib']:.0f} | {row['setup_mib']:.0f} | {row['step_mib']:.0f} | "
              f"{min(row['step_s']):.1f} | {row['loss'][0]:.4f} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
