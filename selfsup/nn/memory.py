"""A per-sample memory: one row per training image, keyed by the image's index in the training set.

PIRL's memory bank (Misra & van der Maaten 2019, arXiv:1912.01991 §3.2) and DeepCluster-v2's memory of
projections and cluster assignments (Caron et al. 2020, arXiv:2006.09882 appendix A) are this structure.
It is sized by the largest index seen rather than by the dataset, so a method needs no dataset size at
construction; it grows on write and a checkpoint of a grown memory loads into a fresh (empty) one.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class IndexedMemory(nn.Module):
    """``rows`` (N, dim) of ``dtype`` and a ``filled`` (N,) mask, N = 1 + the largest index written so far.

    Rows never written hold ``fill``. Both are buffers: they move with ``.to(device)`` and are saved in the
    state dict, so a resumed run sees the same memory.
    """

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, fill: float = 0):
        super().__init__()
        if dim < 1:
            raise ValueError(f"memory rows need dim ≥ 1, got {dim}")
        self.fill = fill
        self.register_buffer("rows", torch.full((0, dim), fill, dtype=dtype))
        self.register_buffer("filled", torch.zeros(0, dtype=torch.bool))

    def __len__(self) -> int:
        return self.rows.shape[0]

    @torch.no_grad()
    def grow(self, n: int) -> None:
        """Make room for indices < ``n``; new rows hold ``fill`` and are not filled."""
        extra = n - len(self)
        if extra > 0:
            self.rows = torch.cat([self.rows, self.rows.new_full((extra, self.rows.shape[1]), self.fill)])
            self.filled = torch.cat([self.filled, self.filled.new_zeros(extra)])

    @torch.no_grad()
    def write(self, index: Tensor, values: Tensor) -> None:
        """Store (B, dim) ``values`` (detached) at the (B,) sample indices ``index``."""
        index = index.to(self.rows.device)
        if not index.numel():
            return
        self.grow(int(index.max()) + 1)
        self.rows[index] = values.detach().to(self.rows.dtype).reshape(len(index), self.rows.shape[1])
        self.filled[index] = True

    def read(self, index: Tensor) -> Tensor:
        """(B, dim) rows at ``index`` (a copy); indices never written give ``fill``."""
        index = index.to(self.rows.device)
        if index.numel():
            self.grow(int(index.max()) + 1)
        return self.rows[index].clone()

    def filled_indices(self) -> Tensor:
        """(M,) indices of the rows written so far, ascending."""
        return self.filled.nonzero().squeeze(1)

    @torch.no_grad()
    def clear(self) -> None:
        """Every row back to ``fill`` and unfilled; the size is kept."""
        self.rows.fill_(self.fill)
        self.filled.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint's memory has grown with the data, so it is larger than a fresh one: resize to fit first.
        for name in ("rows", "filled"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, getattr(self, name).new_zeros(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
