"""Class-imbalanced (long-tailed) subsets, for testing methods that claim robustness to imbalance (MSN).

The profile is the usual exponential long tail (Cui et al. 2019, arXiv:1901.05555; the CIFAR-LT
benchmarks): class k of C keeps n_k = round(max_per_class · decay^(−k/(C−1))) images, so the
largest class is ``decay`` times the smallest.
"""
from __future__ import annotations

import torch

from selfsup.data.imageset import DataError


def long_tail_sizes(num_classes: int, max_per_class: int, decay: float = 10.0) -> list[int]:
    """Class sizes decaying geometrically from ``max_per_class`` (first class) to ``max_per_class / decay``."""
    if num_classes < 1 or max_per_class < 1:
        raise DataError(f"long-tail subset needs ≥ 1 class and max_per_class ≥ 1, got {num_classes}, {max_per_class}")
    if decay < 1:
        raise DataError(f"long-tail decay must be ≥ 1 (largest over smallest class), got {decay}")
    if num_classes == 1:
        return [max_per_class]
    return [max(1, round(max_per_class * decay ** (-k / (num_classes - 1)))) for k in range(num_classes)]


def long_tail_subset(labels: torch.Tensor, max_per_class: int, decay: float = 10.0, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a long-tailed subset of ``labels`` (N,): the classes in ascending label order get
    :func:`long_tail_sizes` images each, drawn at random under ``seed``."""
    labels = torch.as_tensor(labels)
    classes = labels.unique().tolist()
    sizes = long_tail_sizes(len(classes), max_per_class, decay)
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c, k in zip(classes, sizes):
        idx = (labels == c).nonzero().flatten()
        if k > len(idx):
            raise DataError(f"long-tail subset asks for {k} images of class {c}, which has only {len(idx)}; "
                            "lower max_per_class")
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(chosen).sort().values
