"""Which images each step trains on: the epoch's order and this rank's share of every global batch."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The data order of one epoch depends only on (seed, epoch), so a resumed run replays it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def epoch_batches(images: Tensor, order: Tensor, first: int, steps: int, global_batch: int, rank: int, world: int,
                  device: torch.device) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(step in the epoch, indices (B,), uint8 images (B, C, H, W) on ``device``) for steps ``first`` … ``steps``−1.

    Global batch i is ``order[i·G : (i+1)·G]``; rank r takes its r-th slice of B = G / world, so every image is
    seen once per epoch across ranks and the union of the ranks' batches is the one-process batch.
    """
    batch = global_batch // world
    for i in range(first, steps):
        idx = order[i * global_batch + rank * batch : i * global_batch + (rank + 1) * batch]
        yield i, idx, images[idx.to(images.device)].to(device, non_blocking=True)
