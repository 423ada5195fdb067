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
threshold.

The kernel is read as (cout, tap, cin) rows, a view of a channels-last weight (what a channels-last model
holds), and each product is ``F.linear`` against the rows of its taps, so no transposed copy of the kernel
is made. Where every window covers the whole input (3×3 same-padded on 2×2, the last block of the default
recipe) the per-position products are one GEMM against the dense (positions·cout, positions·cin) matrix the
taps make. Whole SimCLR steps (small CNN, batch 256, one process alternating the versions step by step, median
CPU-time ratio; AMD EPYC with AVX-512 BF16): without the transposed copy 1.05× (bf16) and 1.05× (E-SSL, fp32
with the kernels limited to AVX2); the dense GEMM on top 1.05× (bf16, 1 and 2 threads) and 1.00× (AVX2 fp32).

:class:`SmallMapConv2d` has ``nn.Conv2d``'s parameters and state dict and falls through to it for every other
shape; ``benchmarks/bench_step.py`` measures the whole training step.

Strided convolutions in bf16 on CPU (:func:`gemm_wgrad_conv`): oneDNN's bf16 backward-weights kernel
for stride-2 convolutions (``jit_bf16``, not its brgemm kernels) is 15–30× slower than the same product
as one GEMM over the im2col matrix (measured on an AMD EPYC with AVX-512 BF16, batch 512: 32→64 3×3/2
on 14×14: 2.9 s against 86 ms; 64→128 3×3/2 on 7×7: 3.0 s against 114 ms; 64→128 1×1/2: 614 vs 41 ms),
so :class:`SmallMapConv2d` computes that weight gradient as a GEMM there and leaves the forward and the
input gradient to oneDNN. In fp32, and for stride-1 convs in bf16, oneDNN's own kernel is as fast or faster
(fp32: the GEMM is 0.4–0.9× its speed), and it is kept.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_OUTPUT_POSITIONS = 4  # 2×2; from 4×4 outputs on, F.conv2d wins (measured above)
GEMM_WGRAD = True  # strided bf16 convs on CPU take their weight gradient as a GEMM (benchmarks may switch it off)


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
    # (cout, tap, cin): a view for a channels-last weight, so no transposed copy of the kernel is made; each
    # position's product is F.linear against the rows of its taps (a GEMM with the weight transposed in place)
    rows = weight.permute(0, 2, 3, 1).reshape(cout, k * k, cin)
    plan = (_plan.__wrapped__ if torch.compiler.is_compiling() else _plan)(h, w, k, stride, padding, x.device)
    if all(len(inputs) == h * w for inputs, _ in plan):
        # every window covers the whole input (3×3 same-padded on 2×2): one GEMM against the dense
        # (positions·cout, positions·cin) matrix the taps make, with one gather of the kernel
        taps = torch.stack([tap for _, tap in plan]).flatten()  # (out position, in position) → tap
        dense = rows.index_select(1, taps).view(cout, len(plan), -1).transpose(0, 1).reshape(len(plan) * cout, -1)
        out = F.linear(pixels.reshape(n, -1), dense).view(n, len(plan), cout)
    else:
        out = torch.stack([F.linear(pixels.index_select(1, inputs).reshape(n, -1), rows.index_select(1, tap).reshape(cout, -1))
                           for inputs, tap in plan], 1)  # compiled: the plan is traced into the graph as constants
    if bias is not None:
        out = out + bias.to(out.dtype)
    ho, wo = output_size(h, k, stride, padding), output_size(w, k, stride, padding)
    return out.view(n, ho, wo, cout).permute(0, 3, 1, 2)


def conv_weight_grad(x: Tensor, grad_out: Tensor, k: int, stride: int, padding: int) -> Tensor:
    """The gradient of ``F.conv2d(x, w, stride=stride, padding=padding)`` with respect to its (cout, cin, k, k)
    weight, given the output gradient, as one GEMM: ``grad_out (cout × N·Ho·Wo) @ im2col(x) (N·Ho·Wo × k·k·cin)``.
    Returned with channels-last strides (a view of the GEMM's result)."""
    n, cin, _, _ = x.shape
    cout, ho, wo = grad_out.shape[1:]
    pixels = x.permute(0, 2, 3, 1)  # (N, H, W, cin): a view for channels-last input
    if k == 1 and padding == 0:
        cols = pixels[:, ::stride, ::stride][:, :ho, :wo].reshape(n * ho * wo, cin)
    else:
        if padding:
            pixels = F.pad(pixels, (0, 0, padding, padding, padding, padding))
        cols = pixels.unfold(1, k, stride).unfold(2, k, stride)[:, :ho, :wo]  # (N, Ho, Wo, cin, k, k)
        cols = cols.permute(0, 1, 2, 4, 5, 3).reshape(n * ho * wo, k * k * cin)
    grads = grad_out.permute(0, 2, 3, 1).reshape(n * ho * wo, cout)
    return (grads.T @ cols).view(cout, k, k, cin).permute(0, 3, 1, 2)


class _GemmWeightGradConv(torch.autograd.Function):
    """``F.conv2d`` (no bias) whose weight gradient is :func:`conv_weight_grad`; forward and input gradient
    stay oneDNN's."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, stride: int, padding: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, None, stride, padding)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        s, p, k = ctx.stride, ctx.padding, weight.shape[-1]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad_out, x, weight, None, [s, s], [p, p], [1, 1], False,
                                                         [0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = conv_weight_grad(x, grad_out, k, s, p)
        return grad_x, grad_w, None, None


def gemm_wgrad_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1,
                    padding: int = 0) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (square kernel, zero padding, no groups or dilation) with the
    weight gradient computed as one GEMM (:func:`conv_weight_grad`); under autocast in its dtype, as ``F.conv2d``."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    out = _GemmWeightGradConv.apply(x, weight, stride, padding)
    return out if bias is None else out + bias.to(out.dtype).view(1, -1, 1, 1)


def _bf16_on_cpu(x: Tensor, weight: Tensor) -> bool:
    if x.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == weight.dtype == torch.bfloat16


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` that switches to :func:`small_map_conv` where that is exact and faster (≤ 2×2 outputs),
    and to :func:`gemm_wgrad_conv` for strided convs trained in bf16 on CPU (oneDNN's weight gradient is slow)."""

    def _plain(self, x: Tensor) -> bool:
        k, s, p = self.kernel_size[0], self.stride[0], self.padding
        return (self.kernel_size == (k, k) and self.stride == (s, s) and isinstance(p, tuple) and p[0] == p[1] <= k // 2
                and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros" and x.dim() == 4)

    def _small_map_applies(self, x: Tensor) -> bool:
        if not self._plain(x):
            return False
        k, s, p = self.kernel_size[0], self.stride[0], self.padding
        positions = output_size(x.shape[-2], k, s, p[0]) * output_size(x.shape[-1], k, s, p[0])
        return 0 < positions <= MAX_OUTPUT_POSITIONS

    def forward(self, x: Tensor) -> Tensor:
        if self._small_map_applies(x):
            return small_map_conv(x, self.weight, self.bias, self.stride[0], self.padding[0])
        if self._gemm_wgrad_applies(x):
            return gemm_wgrad_conv(x, self.weight, self.bias, self.stride[0], self.padding[0])
        return super().forward(x)

    def _gemm_wgrad_applies(self, x: Tensor) -> bool:
        """A strided conv whose weight gradient will be taken in bf16 on CPU (and with more than a few input
        channels: for a 1-channel stem oneDNN's kernel is faster)."""
        return (GEMM_WGRAD and self.stride[0] > 1 and self.in_channels >= 8 and self.weight.requires_grad and torch.is_grad_enabled()
                and self._plain(x) and _bf16_on_cpu(x, self.weight))
