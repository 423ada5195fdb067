"""torchvision:/timm: backbones on the training loop's fast path: channels-last and bf16 autocast.

1. Checks that a timm ResNet, a timm ViT and a torchvision ResNet run forward + backward under
   channels-last + bf16 autocast (as the loop runs them), with finite outputs and a gradient on every
   parameter, and how far the bf16 features are from fp32 ones.
2. Times forward + backward of one backbone (default ``torchvision:resnet18`` at 64 px, batch 32, one
   thread) in four settings, interleaved round by round so machine noise hits each alike; medians of
   images/s and the ratio to fp32 contiguous; achieved FLOP/s (``torch.utils.flop_counter``) against
   the same process's fp32 / bf16 matmul peak. Prints which CPU kind it ran on (AVX-512 bf16 or not).

    python benchmarks/bench_library_backbones.py [--backbone torchvision:resnet18] [--size 64] [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from selfsup.nn.backbones import build_backbone

SETTINGS = {"fp32": (False, False), "channels_last": (True, False), "bf16": (False, True), "channels_last+bf16": (True, True)}
CHECKS = [("timm:resnet18", {}, 64), ("timm:vit_small_patch16_224", {}, 64), ("torchvision:resnet18", {}, 64)]


def cpu_kind() -> str:
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return "AVX-512 with native bf16 (avx512_bf16)" if "avx512_bf16" in flags else "no avx512_bf16 (bf16 emulated)"


def step(net: torch.nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = net(x)
    out.float().square().mean().backward()
    return out


def check_fast_path() -> None:
    for name, params, size in CHECKS:
        net = build_backbone(name, 3, size, **params)
        x = torch.randn(4, 3, size, size)
        net.eval()  # same features in both precisions (batch-norm on running statistics)
        with torch.no_grad():
            ref = net(x)
        net = net.to(memory_format=torch.channels_last)
        out = step(net, x.contiguous(memory_format=torch.channels_last), bf16=True)
        missing = [n for n, p in net.named_parameters() if p.grad is None]
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        print(f"{name:28s} {size}px channels-last+bf16 fwd+bwd: out {tuple(out.shape)} {out.dtype}, finite "
              f"{bool(torch.isfinite(out.float()).all())}, params without grad {len(missing)}, "
              f"rel. diff to fp32 {rel:.3f}")


def matmul_peak(dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="torchvision:resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"CPU: {cpu_kind()}; torch {torch.__version__}; 1 thread")
    check_fast_path()

    nets = {}
    for setting, (cl, _) in SETTINGS.items():
        torch.manual_seed(0)
        net = build_backbone(args.backbone, 3, args.size)
        nets[setting] = net.to(memory_format=torch.channels_last) if cl else net
    x = torch.randn(args.batch, 3, args.size, args.size)
    inputs = {s: x.contiguous(memory_format=torch.channels_last) if cl else x for s, (cl, _) in SETTINGS.items()}
    with FlopCounterMode(display=False) as counter:
        step(nets["fp32"], x, bf16=False)
    flops = counter.get_total_flops()
    for s, (_, bf16) in SETTINGS.items():  # warm-up
        step(nets[s], inputs[s], bf16)
    times: dict[str, list[float]] = {s: [] for s in SETTINGS}
    for _ in range(args.rounds):
        for s, (_, bf16) in SETTINGS.items():
            t = time.perf_counter()
            step(nets[s], inputs[s], bf16)
            times[s].append(time.perf_counter() - t)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    base = statistics.median(times["fp32"])
    print(f"\n{args.backbone} at {args.size} px, batch {args.batch}, forward+backward, median of {args.rounds} "
          f"interleaved rounds; {flops / args.batch / 1e9:.2f} GFLOP per image; matmul peak fp32 "
          f"{peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    print(f"{'setting':20s} {'images/s':>9s} {'vs fp32':>8s} {'GFLOP/s':>8s} {'of peak':>8s}")
    for s, (_, bf16) in SETTINGS.items():
        med = statistics.median(times[s])
        rate = flops / med
        peak = peaks["bf16" if bf16 else "fp32"]
        print(f"{s:20s} {args.batch / med:9.1f} {base / med:7.2f}× {rate / 1e9:8.1f} {rate / peak:7.0%}")


if __name__ == "__main__":
    main()
