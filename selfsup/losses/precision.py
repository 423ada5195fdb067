"""Losses run in fp32 under bf16 autocast: similarities divided by small temperatures, softmaxes over
thousands of logits and log-sum-exps lose too much in bf16's 8-bit mantissa."""
from __future__ import annotations

import functools

import torch
from torch import Tensor


def at_least_f32(x: Tensor) -> Tensor:
    """bf16/fp16 → fp32 (a differentiable cast); fp32 and fp64 (gradcheck) stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _up(x):
    """A floating tensor, or a list/tuple of them (multi-crop views), brought to at least fp32."""
    if isinstance(x, (list, tuple)):
        return type(x)(_up(v) for v in x)
    return at_least_f32(x) if torch.is_tensor(x) and x.is_floating_point() else x


def fp32_loss(fn):
    """Decorator: floating-point tensor arguments of lower precision, alone or in lists/tuples, are cast
    to fp32 (the cast is differentiable) and autocast is off inside, so the loss and its gradient are computed in fp32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = tuple(_up(a) for a in args)
        kwargs = {k: _up(v) for k, v in kwargs.items()}
        tensors = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else [a])
                   if torch.is_tensor(t)]
        device = tensors[0].device.type if tensors else "cpu"
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper
