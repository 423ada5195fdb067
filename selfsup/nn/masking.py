"""Patches and masks for masked image modelling and latent prediction; every function is batched.

Shapes: images (B, C, H, W); patch sequences (B, L, p·p·C) with L = (H/p)·(W/p) in raster order;
boolean masks (B, L) with ``True`` = hidden from the encoder. A grid is (h, w) patches.

- :func:`patchify` / :func:`unpatchify` — MAE's target layout (He et al. 2021, arXiv:2111.06377).
- :func:`random_masking` — per-sample random subset by argsort of uniform noise (MAE §3).
- :func:`block_masks` — I-JEPA's one context block and M target blocks (Assran et al. 2023,
  arXiv:2301.08243 §3), positions per sample, block sizes per batch as in the reference collator.
- :func:`substitute_mask_tokens` — SimMIM's learnable mask token in place of hidden patch embeddings
  (Xie et al. 2021, arXiv:2111.09886 §3.1).
- :func:`blockwise_masks` — BEiT's blockwise masks with iBOT's random ratio per image, some images left
  unmasked (Bao et al. 2021, arXiv:2106.08254 Algorithm 1; Zhou et al. 2022, arXiv:2111.07832 and its ``loader.py``).
"""
from __future__ import annotations

import math
import random
from typing import NamedTuple

import torch
from torch import Tensor


def patchify(imgs: Tensor, p: int) -> Tensor:
    """(B, C, H, W) → (B, L, p·p·C); each row holds one patch as (row, column, channel)."""
    b, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}×{w} is not divisible by the patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: Tensor, p: int, grid: tuple[int, int] | None = None) -> Tensor:
    """(B, L, p·p·C) → (B, C, H, W), the exact inverse of :func:`patchify`; ``grid`` (h, w) defaults to square."""
    b, n, k = x.shape
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} patches do not form a square grid; pass grid=(h, w)")
        grid = (side, side)
    gh, gw = grid
    if gh * gw != n or k % (p * p):
        raise ValueError(f"cannot unpatchify (B, {n}, {k}) with patch size {p} and grid {grid}")
    c = k // (p * p)
    x = x.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, gh * p, gw * p)


class RandomMask(NamedTuple):
    keep: Tensor
    """(B, K) indices of the visible patches, in the order the encoder sees them."""
    mask: Tensor
    """(B, L) bool, True where a patch is hidden."""
    restore: Tensor
    """(B, L) indices that undo the shuffle: ``gather(cat(kept, hidden), restore)`` is raster order."""


def check_mask_ratio(ratio: float, num_patches: int | None = None) -> None:
    """A ratio in (0, 1) that, on ``num_patches``, leaves at least one patch visible and one hidden."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    if num_patches is not None:
        keep = int(num_patches * (1 - ratio))
        if keep < 1 or keep >= num_patches:
            raise ValueError(f"mask ratio {ratio} on {num_patches} patches keeps {keep}; "
                             "it must keep at least one patch and hide at least one")


def random_masking(batch: int, num_patches: int, ratio: float, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> RandomMask:
    """Hide ``ratio`` of the patches of each sample, a different random subset per sample.

    Every sample keeps exactly ``K = int(L·(1 − ratio))`` patches (MAE's rounding), so the visible
    tokens stack into one (B, K, D) tensor. Sorting uniform noise gives a uniform random permutation.
    """
    check_mask_ratio(ratio, num_patches)
    keep_n = int(num_patches * (1 - ratio))
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=device)
    mask[:, :keep_n] = False
    mask = mask.gather(1, restore)  # back to raster order
    return RandomMask(shuffle[:, :keep_n], mask, restore)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """(B, L, D) tokens, (B, K) indices → (B, K, D)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def substitute_mask_tokens(tokens: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
    """(B, L, D) patch embeddings with hidden ones (mask (B, L), True = hidden) replaced by ``mask_token`` (D,)."""
    w = mask.unsqueeze(-1).to(tokens.dtype)
    return tokens * (1 - w) + mask_token.to(tokens.dtype) * w


class BlockMasks(NamedTuple):
    context: Tensor
    """(B, Kc) patch indices the context encoder sees (sorted), the same count for every sample."""
    targets: Tensor
    """(B, M, Kt) patch indices of each of the M target blocks (sorted)."""


def block_size(grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float],
               generator: torch.Generator | None = None) -> tuple[int, int]:
    """One block (height, width) in patches covering ~``scale`` of the grid with aspect ratio h/w in
    ``aspect``; strictly smaller than the grid when the grid allows (as I-JEPA's collator), at least 1×1."""
    gh, gw = grid
    u = torch.rand(2, generator=generator).tolist()
    area = gh * gw * (scale[0] + u[0] * (scale[1] - scale[0]))
    ar = aspect[0] + u[1] * (aspect[1] - aspect[0])
    h = int(round(math.sqrt(area * ar)))
    w = int(round(math.sqrt(area / ar)))
    h = max(1, min(h, gh - 1 if gh > 1 else 1))
    w = max(1, min(w, gw - 1 if gw > 1 else 1))
    return h, w


def _place_blocks(n: int, grid: tuple[int, int], size: tuple[int, int], device: torch.device | str,
                  generator: torch.Generator | None) -> Tensor:
    """(n, h·w) bool masks, each one block of ``size`` at a uniformly random position."""
    gh, gw = grid
    bh, bw = size
    top = torch.randint(0, gh - bh + 1, (n, 1, 1), generator=generator).to(device)
    left = torch.randint(0, gw - bw + 1, (n, 1, 1), generator=generator).to(device)
    rows = torch.arange(gh, device=device).view(1, gh, 1)
    cols = torch.arange(gw, device=device).view(1, 1, gw)
    inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
    return inside.flatten(1)


def _true_indices(mask: Tensor, k: int) -> Tensor:
    """(…, L) bool with at least ``k`` True per row → (…, k) indices of the first ``k`` True entries."""
    order = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)
    return order[..., :k]


def block_masks(batch: int, grid: tuple[int, int], num_targets: int = 4,
                target_scale: tuple[float, float] = (0.15, 0.2), target_aspect: tuple[float, float] = (0.75, 1.5),
                context_scale: tuple[float, float] = (0.85, 1.0), min_context: int = 1,
                device: torch.device | str = "cpu", generator: torch.Generator | None = None,
                max_tries: int = 20) -> BlockMasks:
    """I-JEPA multi-block masking (arXiv:2301.08243 §3, appendix C; defaults are the paper's).

    Target block size and context block size are drawn once per batch (so every sample's blocks
    stack), their positions per sample. The context is its block minus every target block, so
    the encoder never sees what it must predict; samples left with fewer than ``min_context``
    context patches redraw their blocks, and after ``max_tries`` keep their whole context block
    (overlap allowed, as the reference collator relaxes its constraint). Context sets are cut to the
    smallest count in the batch, each sample dropping a random subset of its own context patches.
    """
    if num_targets < 1:
        raise ValueError(f"num_targets must be ≥ 1, got {num_targets}")
    for name, (lo, hi) in (("target_scale", target_scale), ("context_scale", context_scale),
                           ("target_aspect", target_aspect)):
        if not 0 < lo <= hi or (name != "target_aspect" and hi > 1):
            raise ValueError(f"{name} must satisfy 0 < low ≤ high{' ≤ 1' if name != 'target_aspect' else ''}, "
                             f"got {(lo, hi)}")
    t_size = block_size(grid, target_scale, target_aspect, generator)
    c_size = block_size(grid, context_scale, (1.0, 1.0), generator)
    n_patches = grid[0] * grid[1]
    targets = torch.zeros(batch, num_targets, n_patches, dtype=torch.bool, device=device)
    context = torch.zeros(batch, n_patches, dtype=torch.bool, device=device)
    redo = torch.ones(batch, dtype=torch.bool, device=device)
    for attempt in range(max_tries):
        n = int(redo.sum())
        if n == 0:
            break
        t = _place_blocks(n * num_targets, grid, t_size, device, generator).view(n, num_targets, n_patches)
        c_block = _place_blocks(n, grid, c_size, device, generator)
        targets[redo], context[redo] = t, c_block & ~t.any(dim=1)
        still = context[redo].sum(dim=1) < min_context
        if attempt == max_tries - 1 and bool(still.any()):
            context[redo] = torch.where(still[:, None], c_block, context[redo])
        redo = context.sum(dim=1) < min_context
    keep = int(context.sum(dim=1).min())
    # A random subset of each sample's context, of the common size, then back in raster order.
    score = context.to(torch.float32) * (1 + torch.rand(batch, n_patches, generator=generator).to(device))
    ctx_idx = score.argsort(dim=1, descending=True)[:, :keep].sort(dim=1).values
    return BlockMasks(ctx_idx, _true_indices(targets, t_size[0] * t_size[1]))


def _block_rectangles(rng: random.Random, grid: tuple[int, int], target: float, log_aspect: tuple[float, float],
                      min_block: int) -> tuple[list[list[bool]], list[tuple[int, int, int, int]]]:
    """One image's BEiT mask: rectangles (top, left, h, w) added until ``target`` patches are hidden.

    Each new rectangle has an area drawn in [min_block, patches still to hide] and a log-uniform aspect
    ratio, is strictly smaller than the grid, and must hide at least one new patch and no more than are
    still to hide; ten failed draws in a row end the image (so it may fall a few patches short, never over).
    """
    gh, gw = grid
    hidden = [[False] * gw for _ in range(gh)]
    rects: list[tuple[int, int, int, int]] = []
    count = 0
    while count < target:
        room = target - count
        added = 0
        for _ in range(10):
            area = rng.uniform(min_block, room)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if not (h < gh and w < gw):
                continue
            top, left = rng.randint(0, gh - h), rng.randint(0, gw - w)
            new = sum(not hidden[i][j] for i in range(top, top + h) for j in range(left, left + w))
            if 0 < new <= room:
                for i in range(top, top + h):
                    hidden[i][left:left + w] = [True] * w
                rects.append((top, left, h, w))
                added = new
                break
        if added == 0:
            break
        count += added
    return hidden, rects


def blockwise_masks(batch: int, grid: tuple[int, int], ratio: tuple[float, float] = (0.1, 0.5),
                    mask_probability: float = 0.5, aspect: tuple[float, float] = (0.3, 1 / 0.3), min_block: int = 4,
                    stratified: bool = False, device: torch.device | str = "cpu",
                    generator: torch.Generator | None = None) -> Tensor:
    """(B, h·w) bool masks, True = replaced by the mask token: BEiT blocks, a random ratio per image.

    Each image is masked with probability ``mask_probability`` and then hides ~r·h·w patches, r uniform
    in ``ratio``, as a union of rectangular blocks (BEiT's Algorithm 1, arXiv:2106.08254; see
    :func:`_block_rectangles`); the others stay whole. Defaults are iBOT's ViT recipe (arXiv:2111.07832,
    ``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2``: r ∈ {0, U(0.1, 0.5)} with equal odds; block aspect
    ratio in (0.3, 1/0.3)), which DINOv2 keeps (``mask_ratio_min_max`` (0.1, 0.5),
    ``mask_sample_probability`` 0.5; min 4 patches per block). ``stratified=True`` draws as DINOv2's
    collator does: exactly ⌊B·p⌋ images masked, their ratios spread over ``ratio`` in equal strata,
    assigned to images at random. A masked image hides at most r·h·w patches and may fall a few short
    when the last block finds no room. Deterministic for a given ``generator`` state. Starting masking
    late (iBOT's ``pred_start_epoch``) is the method's choice: ``mask_probability=0`` masks nothing.
    """
    for r in ratio:
        check_mask_ratio(r)
    if len(ratio) != 2 or ratio[0] > ratio[1]:
        raise ValueError(f"mask ratio range must be (low, high) with 0 < low ≤ high < 1, got {ratio}")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    if not 0 < aspect[0] <= aspect[1]:
        raise ValueError(f"block aspect range must satisfy 0 < low ≤ high, got {aspect}")
    if min_block < 1:
        raise ValueError(f"min_block must be ≥ 1 patch, got {min_block}")
    gh, gw = grid
    lo, hi = ratio
    if stratified:
        n_masked = int(batch * mask_probability)
        strata = (torch.arange(n_masked) + torch.rand(n_masked, generator=generator)) / max(n_masked, 1)
        ratios = torch.zeros(batch)
        ratios[torch.randperm(batch, generator=generator)[:n_masked]] = lo + (hi - lo) * strata
    else:
        masked = torch.rand(batch, generator=generator) < mask_probability
        ratios = torch.where(masked, lo + (hi - lo) * torch.rand(batch, generator=generator), 0.0)
    # The block draws are many small scalars: Python's generator, seeded from the torch one, keeps them cheap.
    rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    masks = [_block_rectangles(rng, grid, float(r) * gh * gw, log_aspect, min_block)[0] if r > 0
             else [[False] * gw for _ in range(gh)] for r in ratios.tolist()]
    return torch.tensor(masks, dtype=torch.bool).reshape(batch, gh * gw).to(device)
