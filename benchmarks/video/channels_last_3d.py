"""Training-step time of the video backbones with clips in ``torch.channels_last_3d`` against contiguous (NCDHW)
memory, fp32 and bf16 autocast, on this CPU: whether video runs should use channels_last as image runs do.

One forward + backward of the backbone alone (pooled features, a sum as the loss) on a batch of random clips,
``--repeats`` rounds with the layouts interleaved, median seconds per step, after two warm-up steps each.

    python benchmarks/video/channels_last_3d.py [--batch 32] [--frames 8] [--size 64] [--repeats 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch

from selfsup.nn.backbones import build_backbone

BACKBONES = {"small_r3d": {"widths": [16, 32, 64, 128], "stem_stride": 2},
             "small_r2plus1d": {"widths": [16, 32, 64, 128], "stem_stride": 2},
             "torchvision:r3d_18": {}}


def step(net: torch.nn.Module, x: torch.Tensor, bf16: bool) -> float:
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = net(x)
    out.float().sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backbones", default=",".join(BACKBONES))
    ap.add_argument("--precisions", default="fp32,bf16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print(f"CPU: {'AVX-512 bf16' if 'avx512_bf16' in cpu else 'no native bf16'}; torch {torch.__version__}; "
          f"{args.threads} threads; batch {args.batch} x {args.frames} frames x {args.size} px\n")
    print("| backbone | precision | contiguous s/step | channels_last_3d s/step | speed-up |")
    print("|---|---|---|---|---|")
    for name in args.backbones.split(","):
        torch.manual_seed(0)
        net = build_backbone(name, 3, args.size, **BACKBONES.get(name, {})).train()
        x = torch.randn(args.batch, 3, args.frames, args.size, args.size)
        layouts = {"contiguous": (net, x),
                   "channels_last_3d": (net, x.contiguous(memory_format=torch.channels_last_3d))}
        for precision in args.precisions.split(","):
            bf16 = precision == "bf16"
            times: dict[str, list[float]] = {k: [] for k in layouts}
            for r in range(args.repeats + 2):
                for layout in (list(layouts) if r % 2 == 0 else list(layouts)[::-1]):
                    m, inp = layouts[layout]
                    m.to(memory_format=torch.channels_last_3d if layout != "contiguous" else torch.contiguous_format)
                    m.zero_grad(set_to_none=True)
                    t = step(m, inp, bf16)
                    if r >= 2:
                        times[layout].append(t)
            a, b = statistics.median(times["contiguous"]), statistics.median(times["channels_last_3d"])
            print(f"| {name} | {precision} | {a:.3f} | {b:.3f} | {a / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
