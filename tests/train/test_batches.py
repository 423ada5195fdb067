"""Which images each rank trains on: every image once per epoch across ranks, the union of the ranks' batches
being the one-process batch."""
from __future__ import annotations

import pytest
import torch

from selfsup.data.imageset import ImageSet
from selfsup.train.batches import epoch_batches, epoch_order, rank_batches


@pytest.mark.parametrize("n, global_batch, world", [(100, 20, 1), (100, 20, 2), (103, 24, 4), (64, 64, 2),
                                                     (1000, 96, 3)])
def test_ranks_split_every_global_batch_disjointly(n, global_batch, world):
    order = epoch_order(n, seed=3, epoch=5)
    steps = n // global_batch
    per_rank = [list(rank_batches(order, 0, steps, global_batch, r, world)) for r in range(world)]
    for r in range(world):
        assert len(per_rank[r]) == steps
        assert all(len(b) == global_batch // world for b in per_rank[r])
    for i in range(steps):
        union = torch.cat([per_rank[r][i] for r in range(world)])
        assert torch.equal(union, order[i * global_batch : (i + 1) * global_batch])  # the one-process batch
    seen = torch.cat([b for batches in per_rank for b in batches])
    assert len(seen.unique()) == len(seen) == steps * global_batch  # nothing read twice in the epoch
    assert set(seen.tolist()) <= set(range(n))


def test_a_resumed_epoch_reads_the_rest_of_the_same_order():
    order = epoch_order(50, seed=0, epoch=2)
    assert torch.equal(order, epoch_order(50, seed=0, epoch=2))  # every rank and every resume draws the same
    assert not torch.equal(order, epoch_order(50, seed=0, epoch=3))
    full = list(rank_batches(order, 0, 5, 10, 1, 2))
    resumed = list(rank_batches(order, 3, 5, 10, 1, 2))
    assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed))


@pytest.mark.parametrize("held", ["resident", "in_memory"])
def test_every_way_of_holding_a_folder_keeps_its_aspect_ratios(held):
    """A folder small enough to sit on the GPU (``resident``) still has its crops drawn in the original images'
    pixel space: the aspect ratios come with every batch, as they do when records are read from RAM or disk."""
    images = torch.randint(0, 255, (12, 3, 8, 8), dtype=torch.uint8)
    aspect = torch.linspace(0.5, 3.0, 12)
    train = ImageSet(images, aspect=aspect)
    order = epoch_order(12, seed=0, epoch=1)
    resident = images if held == "resident" else None  # what resident_images holds on a GPU
    batches = list(epoch_batches(train, resident, order, 0, 3, 4, 0, 1, torch.device("cpu")))
    assert len(batches) == 3
    for _, idx, x, got in batches:
        assert torch.equal(x, images[idx]) and torch.equal(got, aspect[idx])
