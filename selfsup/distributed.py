"""torchrun / torch.distributed plumbing; the one place collectives live.

Losses never call collectives themselves: a method passes ``gather=True`` and the loss calls
:func:`gather` here, whose backward sums the gradients of every rank's copy so the result is
exactly the single-process gradient once DDP averages over ranks.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

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


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs); False when not under torchrun."""
    if not launched_by_torchrun() or is_distributed():
        return is_distributed()
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def shutdown(barrier: bool = False) -> None:
    """Leave the process group. ``barrier=True`` (after a run that ended normally) first waits for every process,
    so none tears its connections down while another is still finishing (rank 0 writes the encoder last):
    a rank that exited early was seen to abort in gloo's teardown now and then (SIGABRT, "terminate called
    without an active exception"). Not after an error: the other processes may be stuck in a collective."""
    if is_distributed():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def leave_worker() -> NoReturn:
    """End a torchrun worker whose run finished normally (its files written, the process group left) at once,
    without the interpreter's teardown: the one place a rank was still seen to abort, now and then, after all
    its work was done ("terminate called without an active exception" with no Python frame: most likely gloo's
    C++ threads being torn down at exit; not reproduced on demand), which made torchrun report a finished run as
    failed. Output is flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.rows = x.shape[0]
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x)
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on these rows: sum their gradients
        start = rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` (N, …) from every rank along dim 0, in rank order, keeping autograd.

    With one process this is the identity. The backward sums the gradients every rank's loss sends
    to these rows, so after DDP averages parameter gradients over ranks the result equals the
    single-process gradient of the global batch (tests/test_distributed.py checks it). Every rank
    must pass the same number of rows.
    """
    if not is_distributed() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x.contiguous())


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
