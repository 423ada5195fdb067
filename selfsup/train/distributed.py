"""torchrun / torch.distributed plumbing; the one place collectives live.

Losses never call collectives themselves: a method passes ``gather=True`` and the loss calls
:func:`gather` here, whose backward sums the gradients of every rank's copy so the result is
exactly the single-process gradient once DDP averages over ranks.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` (N, …) from every rank along dim 0, rank order, keeping autograd.

    With one process this is the identity. The backward of ``torch.distributed.nn.all_gather``
    all-reduces (sums) the incoming gradients, so each rank receives the gradient of the global
    loss with respect to its own rows.
    """
    if not is_distributed() or world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """``gather`` for tensors that need no gradient (queue pushes, statistics)."""
    if not is_distributed() or world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean over ranks (for centres and batch statistics); identity on one process."""
    if not is_distributed() or world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()
