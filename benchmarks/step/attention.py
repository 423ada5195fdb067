"""CPU attention: ``F.scaled_dot_product_attention`` against plain matmul + softmax, forward + backward.

The ViT methods' sequences are short (10–197 tokens) with many (batch × head) rows. Prints the median
CPU time of 5 repeats per (dtype, tokens) on one thread; ``selfsup.train.device.choose_attention`` acts
on the result (plain attention when training under bf16 autocast on a CPU).

    python benchmarks/step/attention.py [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def plain(q, k, v):
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v


def median_ms(fn, q, k, v, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn(q, k, v).sum().backward()
        times.append(time.process_time() - t)
    return 1000 * sorted(times)[repeats // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| dtype | tokens | batch×heads | fused (ms) | plain (ms) | fused / plain |\n|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for tokens, batch in ((10, 512), (50, 256), (65, 64), (128, 64), (197, 64)):
            q, k, v = (torch.randn(batch, 3, tokens, 64, dtype=dtype, requires_grad=True) for _ in range(3))
            fused, mine = median_ms(F.scaled_dot_product_attention, q, k, v), median_ms(plain, q, k, v)
            print(f"| {str(dtype)[6:]} | {tokens} | {batch}×3 | {fused:.1f} | {mine:.1f} | {fused / mine:.2f} |")


if __name__ == "__main__":
    main()
