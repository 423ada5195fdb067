"""Grid tiles and tile permutations, shared by jigsaw, relative patch position and PIRL.

Geometry (Noroozi & Favaro 2016, arXiv:1603.09246, §3; Doersch et al. 2015, arXiv:1505.05192, §3):
an S×S view is divided into a ``grid``×``grid`` array of cells of side ``cell = S // grid`` (the
grid is centred; leftover border pixels are unused). From each cell a tile of side
``cell − gap`` is cut at a random offset in [0, gap]² drawn per sample and per tile, so adjacent
tiles are separated by 0 … 2·gap pixels (gap on average) and their edges cannot be matched to
solve the task.

Permutation sets (Noroozi & Favaro, §3.2 and Algorithm 1): a greedy farthest-point selection over
all (grid²)! permutations. The paper's Algorithm 1 adds, at each step, the permutation with the
largest *summed* Hamming distance to those chosen; run as written it leaves pairs at distance 2
(measured: 100 permutations of 9 tiles, minimum distance 2, mean 8.08). The task is hardest to
read exactly at the closest pair, so here each step maximises the *minimum* distance to the chosen
set, breaking ties by the summed distance (the paper's criterion): the same mean distance (8.08),
and a minimum distance of 6 for 100 permutations of 9 tiles (7 for 30, 5 for 1000).
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MIN_TILE = 2
"""Smallest tile side (pixels) a grid may produce; below it there is no pattern left to recognise."""


def tile_geometry(image_size: int, grid: int, gap: int) -> tuple[int, int]:
    """(cell side, tile side) in pixels for an ``image_size``² view."""
    cell = image_size // grid
    return cell, cell - gap


def check_grid(image_size: int, grid: int, gap: int, who: str = "tiles") -> list[str]:
    """Problems with cutting a ``grid``×``grid`` array of tiles with ``gap`` from an ``image_size``² view."""
    if grid < 2:
        return [f"{who}: grid must be ≥ 2, got {grid}"]
    if gap < 0:
        return [f"{who}: gap must be ≥ 0 pixels, got {gap}"]
    cell, tile = tile_geometry(image_size, grid, gap)
    if tile < MIN_TILE:
        return [f"{who}: a {grid}×{grid} grid does not fit a {image_size}×{image_size} view with gap {gap}: cells are "
                f"{cell} px, tiles {tile} px (need ≥ {MIN_TILE}); use a smaller grid or gap, or larger views "
                f"(≥ {grid * (gap + MIN_TILE)} px)"]
    return []


def cut_tiles(x: Tensor, grid: int, gap: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Tiles of every sample, row-major over the grid, each at its own random offset in its cell.

    x: (B, C, S, S). Returns tiles (B, grid², C, t, t) with t = S // grid − gap, and the offsets
    (B, grid², 2) as (dy, dx) in [0, gap] of each tile inside its cell.
    """
    b, c, h, w = x.shape
    problems = check_grid(min(h, w), grid, gap)
    if problems:
        raise ValueError(problems[0])
    cell, tile = tile_geometry(min(h, w), grid, gap)
    n = grid * grid
    offsets = torch.randint(0, gap + 1, (b, n, 2), device=x.device, generator=generator)
    cells = torch.arange(n, device=x.device)
    top = (h - grid * cell) // 2 + (cells // grid) * cell  # (n,)
    left = (w - grid * cell) // 2 + (cells % grid) * cell
    span = torch.arange(tile, device=x.device)
    rows = (top[None, :] + offsets[..., 0])[..., None] + span  # (B, n, t)
    cols = (left[None, :] + offsets[..., 1])[..., None] + span
    batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    # One gather for every tile of every sample: (B, n, t, t, C) from channels-last pixels.
    tiles = x.permute(0, 2, 3, 1)[batch, rows[..., :, None], cols[..., None, :]]
    return tiles.permute(0, 1, 4, 2, 3).contiguous(), offsets


def assemble_tiles(tiles: Tensor, grid: int) -> Tensor:
    """Inverse of cutting with gap 0: (B, grid², C, t, t) → (B, C, grid·t, grid·t), row-major."""
    b, n, c, t, _ = tiles.shape
    if n != grid * grid:
        raise ValueError(f"expected {grid * grid} tiles, got {n}")
    x = tiles.view(b, grid, grid, c, t, t).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, grid * t, grid * t)


def tile_batch(tiles: Tensor, tile_size: int | None = None) -> Tensor:
    """(B, n, C, t, t) → (B·n, C, s, s), one backbone call for every tile; resized to ``tile_size`` when set."""
    flat = tiles.flatten(0, 1)
    if tile_size and tile_size != flat.shape[-1]:
        flat = F.interpolate(flat, size=(tile_size, tile_size), mode="bilinear", align_corners=False)
    return flat


def shuffle_tiles(tiles: Tensor, perm: Tensor) -> Tensor:
    """Puzzle position i shows tile ``perm[b, i]``: tiles (B, n, …), perm (B, n) → (B, n, …)."""
    index = perm.view(*perm.shape, *([1] * (tiles.ndim - 2))).expand_as(tiles)
    return tiles.gather(1, index)


def unshuffle_tiles(shuffled: Tensor, perm: Tensor) -> Tensor:
    """Inverse of :func:`shuffle_tiles` given the same ``perm``: the tiles back in grid order."""
    return shuffle_tiles(shuffled, perm.argsort(dim=1))


def normalize_tiles(tiles: Tensor, eps: float = 0.1) -> Tensor:
    """Each tile to zero mean and unit std on its own (Noroozi & Favaro §3.1), so low-level statistics
    shared by neighbouring tiles do not give the arrangement away. tiles: (…, C, t, t); std floored at ``eps``
    so flat background tiles are not blown up into noise."""
    mean = tiles.mean(dim=(-3, -2, -1), keepdim=True)
    std = tiles.std(dim=(-3, -2, -1), keepdim=True).clamp_min(eps)
    return (tiles - mean) / std


@lru_cache(maxsize=4)
def _all_permutations(n: int) -> np.ndarray:
    """Every permutation of ``n`` items in lexicographic order, (n!, n) uint8."""
    flat = itertools.chain.from_iterable(itertools.permutations(range(n)))
    return np.fromiter(flat, dtype=np.uint8, count=n * math.factorial(n)).reshape(-1, n)


def permutation_set(size: int, tiles: int = 9, seed: int = 0) -> Tensor:
    """``size`` permutations of ``tiles`` items, far apart in Hamming distance; (size, tiles) int64.

    Deterministic given (size, tiles, seed). Greedy max-min selection (module docstring): the first
    permutation is drawn with ``seed``, each next one maximises the minimum Hamming distance to the set
    so far, ties broken by the largest summed distance, then by the lowest lexicographic rank.
    """
    if tiles > 9:
        raise ValueError(f"permutation sets enumerate all tiles! permutations; {tiles} tiles is too many (≤ 9, a 3×3 grid)")
    total = math.factorial(tiles)
    if not 1 <= size <= total:
        raise ValueError(f"a permutation set of {size} is impossible: {tiles} tiles have {total} permutations "
                         f"(choose 1 … {total})")
    return torch.from_numpy(_greedy_set(size, tiles, seed).astype(np.int64))


@lru_cache(maxsize=16)
def _greedy_set(size: int, tiles: int, seed: int) -> np.ndarray:
    perms = _all_permutations(tiles)
    total = perms.shape[0]
    # onehot[i * tiles + v, k] = 1 when permutation k has value v at position i, so the number of positions
    # where every permutation agrees with p is a sum of ``tiles`` rows (numpy: ~1 ms a step for 9! rows).
    onehot = np.zeros((tiles * tiles, total), dtype=np.uint8)
    onehot[np.arange(tiles)[None, :] * tiles + perms, np.arange(total)[:, None]] = 1
    positions = np.arange(tiles) * tiles
    chosen = [int(np.random.default_rng(seed).integers(total))]
    min_dist = np.full(total, tiles, dtype=np.int64)
    sum_dist = np.zeros(total, dtype=np.int64)
    for _ in range(size - 1):
        rows = positions + perms[chosen[-1]]
        agree = onehot[rows[0]].copy()
        for r in rows[1:]:
            agree += onehot[r]
        d = tiles - agree.astype(np.int64)
        np.minimum(min_dist, d, out=min_dist)
        sum_dist += d
        score = min_dist * (tiles * size + 1) + sum_dist  # min distance first, summed distance breaks ties
        score[chosen] = -1
        chosen.append(int(score.argmax()))
    return perms[chosen]


def min_hamming(perms: Tensor) -> int:
    """Smallest Hamming distance between two rows of (N, n) permutations (n + 1 for a single row)."""
    if perms.shape[0] < 2:
        return perms.shape[1] + 1
    d = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    d.fill_diagonal_(perms.shape[1] + 1)
    return int(d.min())
