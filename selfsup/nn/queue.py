"""A first-in-first-out memory of embeddings (MoCo's queue, NNCLR's support set, memory banks)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class MemoryQueue(nn.Module):
    """Holds the last ``size`` rows pushed; rows are stored detached, so no gradient flows into them.

    The write pointer wraps around, so ``size`` need not be a multiple of the batch
    (MoCo, He et al. 2020, arXiv:1911.05722, Algorithm 1). Contents are buffers: they move with
    ``.to(device)`` and are saved in the state dict, so a resumed run sees the same queue.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be ≥ 1, got {size}")
        self.register_buffer("rows", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.rows.shape[0]

    @property
    def full(self) -> bool:
        return int(self.count) >= self.size

    @torch.no_grad()
    def push(self, x: Tensor) -> None:
        """Append (N, dim) rows, overwriting the oldest; if N > size only the newest ``size`` stay."""
        x = x.detach().to(self.rows.dtype)[-self.size :]
        n, ptr = x.shape[0], int(self.ptr)
        first = min(n, self.size - ptr)
        self.rows[ptr : ptr + first] = x[:first]
        if n > first:
            self.rows[: n - first] = x[first:]
        self.ptr.fill_((ptr + n) % self.size)
        self.count.fill_(min(int(self.count) + n, self.size))

    def contents(self) -> Tensor:
        """The filled rows (oldest slot order not guaranteed), detached."""
        return self.rows[: int(self.count)] if not self.full else self.rows
