"""Which images each step trains on, and reading them: the epoch's order, this rank's share of every global
batch, and the uint8 batch on the training device.

An in-memory set is indexed directly (on a GPU, a copy held on the device when it fits); a set backed by
the on-disk cache is read ahead in a background thread (:func:`selfsup.data.prefetch_batches`), so the
process holds a bounded number of batches whatever the size of the collection (the OS page cache does the
rest).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from selfsup.data import ImageSet, prefetch_batches

GPU_RESIDENT_MAX_BYTES = 2**31
"""In-memory sets up to this size are copied to the GPU once, so a batch is one gather on the device."""


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The data order of one epoch depends only on (seed, epoch), so a resumed run replays it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def resident_images(train: ImageSet, device: torch.device) -> Tensor | None:
    """The training records held on the GPU for the whole run (small in-memory sets on CUDA), else None."""
    if device.type == "cuda" and not train.mapped and train.nbytes <= GPU_RESIDENT_MAX_BYTES:
        return train.images.to(device)
    return None


def rank_batches(order: Tensor, first: int, steps: int, global_batch: int, rank: int, world: int) -> Iterator[Tensor]:
    """Rank ``rank``'s indices of global batches ``first`` … ``steps``−1: global batch i is
    ``order[i·G : (i+1)·G]``, and rank r takes its r-th slice of B = G / world, so every image is seen once per
    epoch across ranks and the union of the ranks' batches is the one-process batch."""
    batch = global_batch // world
    for i in range(first, steps):
        yield order[i * global_batch + rank * batch : i * global_batch + (rank + 1) * batch]


def epoch_batches(train: ImageSet, resident: Tensor | None, order: Tensor, first: int, steps: int,
                  global_batch: int, rank: int, world: int,
                  device: torch.device) -> Iterator[tuple[int, Tensor, Tensor, Tensor | None]]:
    """(step in the epoch, indices (B,), uint8 images (B, C, S, S) on ``device``, aspect (B,) on ``device`` or
    None) for steps ``first`` … ``steps``−1 of this rank."""
    indices = rank_batches(order, first, steps, global_batch, rank, world)
    if resident is not None:  # an image folder's aspect ratios come along however its records are held
        reader = ((idx, resident[idx.to(device)], train.aspect_at(idx)) for idx in indices)
    elif train.mapped:
        reader = prefetch_batches(train, indices, depth=2, pin_memory=device.type == "cuda")
    else:
        reader = ((idx, train.batch(idx), train.aspect_at(idx)) for idx in indices)
    for i, (idx, x, aspect) in enumerate(reader, start=first):
        aspect = None if aspect is None else aspect.to(device, non_blocking=True)
        yield i, idx, x.to(device, non_blocking=True), aspect
