"""Convolutions whose output map is tiny (at most 2×2), computed as one matrix product per output position.

Each output position of a convolution is a linear function of the input pixels its kernel window
covers. When the output has only a few positions, gathering for each one just the taps that land
inside the input (``im2col`` without the zero padding) and multiplying by the matching rows of the
kernel is exact, skips the multiply-adds against padding (20 of 36 for a 3×3 kernel on a 2×2 map,
11 of 36 for a stride-2 3×3 kernel from 4×4 to 2×2) and runs on the matrix-multiply kernels, which
reach the CPU's peak far better than the convolution's backward pass does at these shapes.

Measured on 2 CPU cores, batch 512, forward + backward, bf16 autocast (fp32 in brackets):
512→512 on 2×2, 3×3: 50 ms against ``F.conv2d``'s 104 ms (94 vs 142); 128→512, 3×3 stride 2,
4×4→2×2: 18 vs 36 ms (35 vs 50). On 4×4 outputs and larger, ``F.conv2d`` is faster, hence the
threshold. :class:`SmallMapConv2d` has ``nn.Conv2d``'s parameters and state dict and falls through to
it for every other shape; ``benchmarks/bench_step.py`` measures the whole training step.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor, nn

MAX_OUTPUT_POSITIONS = 4  # 2×2; from 4×4 outputs on, F.conv2d wins (measured above)


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@lru_cache(maxsize=None)
def _plan(h: int, w: int, k: int, stride: int, padding: int, device: torch.device) -> tuple[tuple[Tensor, Tensor], ...]:
    """For each output position: the flat input positions its window covers and the kernel taps that meet them."""
    plan = []
    for oi in range(output_size(h, k, stride, padding)):
        for oj in range(output_size(w, k, stride, padding)):
            pairs = [((oi * stride - padding + ki) * w + oj * stride - padding + kj, ki * k + kj)
                     for ki in range(k) for kj in range(k)
                     if 0 <= oi * stride - padding + ki < h and 0 <= oj * stride - padding + kj < w]
            inputs, taps = zip(*pairs)
            with torch.inference_mode(False):  # cached: must stay usable by autograd after an inference-mode call
                plan.append((torch.tensor(inputs, device=device), torch.tensor(taps, device=device)))
    return tuple(plan)


def small_map_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1, padding: int = 0) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (square kernel, zero padding, no groups or dilation)
    as one GEMM per output position over the taps inside the input. Returns channels-last strides."""
    n, cin, h, w = x.shape
    cout, _, k, _ = weight.shape
    if torch.is_autocast_enabled(x.device.type):  # gather in the low dtype: half the bytes moved
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    pixels = x.permute(0, 2, 3, 1).reshape(n, h * w, cin)  # a view for channels-last input
    taps = weight.permute(2, 3, 1, 0).reshape(k * k, cin, cout)
    outputs = [pixels.index_select(1, inputs).reshape(n, -1) @ taps.index_select(0, tap).reshape(-1, cout)
               for inputs, tap in _plan(h, w, k, stride, padding, x.device)]
    out = torch.stack(outputs, 1)
    if bias is not None:
        out = out + bias.to(out.dtype)
    ho, wo = output_size(h, k, stride, padding), output_size(w, k, stride, padding)
    return out.view(n, ho, wo, cout).permute(0, 3, 1, 2)


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` that switches to :func:`small_map_conv` where that is exact and faster (≤ 2×2 outputs)."""

    def _small_map_applies(self, x: Tensor) -> bool:
        k, s, p = self.kernel_size[0], self.stride[0], self.padding
        if not (self.kernel_size == (k, k) and self.stride == (s, s) and isinstance(p, tuple) and p[0] == p[1] <= k // 2
                and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros" and x.dim() == 4):
            return False
        positions = output_size(x.shape[-2], k, s, p[0]) * output_size(x.shape[-1], k, s, p[0])
        return 0 < positions <= MAX_OUTPUT_POSITIONS

    def forward(self, x: Tensor) -> Tensor:
        if self._small_map_applies(x):
            return small_map_conv(x, self.weight, self.bias, self.stride[0], self.padding[0])
        return super().forward(x)
