"""What the frozen teacher costs per distillation step, beside the student's own work, on this CPU.

    OMP_NUM_THREADS=1 python benchmarks/distill/teacher_cost.py [--size 64] [--batch 64] [--repeats 5]

The recipe's pair (configs/distill_fashion_mnist.yaml): teacher = the default recipe's CNN (small_resnet 32-64-128-512,
stem stride 2, last 2×2 map kept: 2,048-d), student = small_resnet 16-32-64-128 (512-d), both channels-last as the loop
runs them, grey images at ``--size`` px, two views of ``--batch`` images. Per precision (fp32, and bf16 autocast where
the CPU has avx512_bf16), medians over ``--repeats`` after one warm-up:

- ``teacher``: the teacher's forward of both views under ``torch.no_grad()`` (``Distill.teacher_embeddings``);
- ``step``: the whole distillation step (teacher, student forward, queue loss, backward) as the loop runs it;
- ``student``: ``step − teacher``, what a student step without the teacher costs;
- ``queue_loss``: of that, SEED's loss alone (forward and backward against the full 4,096-row queue).

Prints one JSON object per precision (and the CPU kind); benchmarks/distill/README.md quotes them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import time

import torch

from selfsup.losses.teacher import queue_distillation_loss
from selfsup.methods import METHODS
from selfsup.methods.base import make_progress, run_after_step
from selfsup.nn.backbones import build_backbone

TEACHER = {"widths": [32, 64, 128, 512], "stem_stride": 2, "pool_grid": 2}
STUDENT = {"widths": [16, 32, 64, 128], "stem_stride": 2, "pool_grid": 2}


def cpu_kind() -> tuple[str, bool]:
    """(the CPU's model name, whether it has native bf16: ``lscpu | grep -o avx512_bf16``)."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "unknown CPU")
    return name, "avx512_bf16" in out


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(size: int, batch: int, repeats: int, bf16: bool) -> dict:
    torch.manual_seed(0)
    teacher = build_backbone("small_resnet", 1, size, **TEACHER)
    student = build_backbone("small_resnet", 1, size, **STUDENT)
    method = METHODS["distill"].cls(student, teacher=teacher, queue_size=4096, proj_hidden=512)
    method = method.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    views = [torch.randn(batch, 1, size, size).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    both = torch.cat(views)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    progress = make_progress(method, 0, 100, 0, 100)

    def teacher_only() -> None:
        with amp():
            method.teacher_embeddings(both)

    def step() -> None:
        with amp():
            loss, logs = method.training_step(views, progress)
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        opt.step()
        run_after_step(method, progress, logs)

    for _ in range(4096 // (2 * batch) + 1):  # a full queue, as after the first epoch's first steps
        step()
    dim = teacher.num_features
    p = torch.randn(2 * batch, dim, requires_grad=True)
    t, queue = torch.randn(2 * batch, dim), method.queue.contents()

    def loss_only() -> None:
        queue_distillation_loss(p, t, queue).backward()

    t_teacher, t_step, t_loss = timed(teacher_only, repeats), timed(step, repeats), timed(loss_only, repeats)
    count = lambda m: sum(p.numel() for p in m.parameters())
    return {"precision": "bf16 autocast" if bf16 else "fp32", "size": size, "views": 2 * batch,
            "threads": torch.get_num_threads(), "teacher_params": count(teacher), "student_params": count(student),
            "teacher_s": round(t_teacher, 4), "step_s": round(t_step, 4), "student_s": round(t_step - t_teacher, 4),
            "queue_loss_s": round(t_loss, 4),
            "teacher_share_of_step": round(t_teacher / t_step, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    name, has_bf16 = cpu_kind()
    print(json.dumps({"cpu": name, "avx512_bf16": has_bf16, "torch": torch.__version__}))
    for bf16 in (False, True) if has_bf16 else (False,):  # bf16 is emulated, hundreds of times slower, without it
        print(json.dumps(measure(args.size, args.batch, args.repeats, bf16)), flush=True)


if __name__ == "__main__":
    main()
