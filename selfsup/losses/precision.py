"""Losses run in fp32 under bf16 autocast: similarities divided by small temperatures, softmaxes over
thousands of logits and log-sum-exps lose too much in bf16's 8-bit mantissa."""
from __future__ import annotations

import functools

import torch


def _up(x):
    if torch.is_tensor(x) and x.is_floating_point() and x.dtype in (torch.bfloat16, torch.float16):
        return x.float()
    return x


def fp32_loss(fn):
    """Decorator: floating-point tensor arguments of lower precision are cast to fp32 (the cast is
    differentiable) and autocast is off inside, so the loss and its gradient are computed in fp32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = tuple(_up(a) for a in args)
        kwargs = {k: _up(v) for k, v in kwargs.items()}
        tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
        device = tensors[0].device.type if tensors else "cpu"
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper
