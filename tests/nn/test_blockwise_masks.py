"""BEiT blockwise masks with iBOT's random ratio per image (arXiv:2106.08254 Alg. 1; arXiv:2111.07832):
per-image counts against the drawn ratio, masks made of rectangles, the unmasked share, DINOv2's
stratified draw, determinism under a seed, and the errors."""
from __future__ import annotations

import math
import random

import pytest
import torch

from selfsup.nn.masking import _block_rectangles, blockwise_masks

LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))


@pytest.mark.parametrize("grid", [(7, 7), (8, 8), (14, 14), (6, 10)])
@pytest.mark.parametrize("r", [0.1, 0.3, 0.5])
def test_each_masked_image_hides_its_ratio(grid, r):
    """A fixed ratio (low = high): every image hides at most r·L patches and at most 3 fewer (the last
    block may find no room; the largest shortfall measured over 512 images per setting was 2.8)."""
    n = grid[0] * grid[1]
    m = blockwise_masks(64, grid, (r, r), mask_probability=1.0, generator=torch.Generator().manual_seed(0))
    assert m.shape == (64, n) and m.dtype == torch.bool
    counts = m.sum(1).float()
    assert (counts <= r * n).all() and (counts > r * n - 3).all()


def test_ratios_drawn_per_image_within_the_range():
    g = torch.Generator().manual_seed(0)
    m = blockwise_masks(400, (8, 8), (0.1, 0.5), mask_probability=0.5, generator=g)
    frac = m.float().mean(1)
    masked = frac > 0
    # iBOT: r ∈ {0, U(0.1, 0.5)} with equal odds.
    assert 0.4 < masked.float().mean() < 0.6
    assert (frac[masked] <= 0.5).all() and (frac[masked] > 0.1 - 3 / 64).all()
    assert frac[masked].std() > 0.08  # the ratio varies per image (uniform on (0.1, 0.5): std ≈ 0.115)
    assert not blockwise_masks(16, (8, 8), mask_probability=0.0).any()  # iBOT before pred_start_epoch
    assert (blockwise_masks(16, (8, 8), mask_probability=1.0).sum(1) > 0).all()


def test_stratified_masks_exactly_floor_b_p_images():
    g = torch.Generator().manual_seed(3)
    m = blockwise_masks(10, (8, 8), (0.1, 0.5), mask_probability=0.5, stratified=True, generator=g)
    counts = m.sum(1)
    assert int((counts > 0).sum()) == 5
    # One ratio from each fifth of (0.1, 0.5): the sorted counts climb through the strata.
    got = sorted(counts[counts > 0].tolist())
    for i, c in enumerate(got):
        lo, hi = 0.1 + 0.08 * i, 0.1 + 0.08 * (i + 1)
        assert lo * 64 - 3 < c <= hi * 64


def test_masks_are_unions_of_rectangular_blocks():
    rng = random.Random(0)
    for _ in range(200):
        gh, gw = rng.choice([(7, 7), (8, 8), (14, 14), (5, 9)])
        target = rng.uniform(0.1, 0.5) * gh * gw
        hidden, rects = _block_rectangles(rng, (gh, gw), target, LOG_ASPECT, 4)
        painted = [[False] * gw for _ in range(gh)]
        for top, left, h, w in rects:
            assert 1 <= h < gh and 1 <= w < gw and 0 <= top <= gh - h and 0 <= left <= gw - w
            # Blocks, not scattered patches: a single patch only fills a remainder (area drawn in [room, 4]
            # rounds to 1×1 only below 2.25 patches still to hide).
            assert h * w > 1 or target - sum(map(sum, painted)) < 2.25
            for i in range(top, top + h):
                for j in range(left, left + w):
                    painted[i][j] = True
        assert painted == hidden  # the mask is exactly the union of its blocks
        assert len(rects) >= 1


def test_blocks_in_the_public_masks():
    """The public masks are connected regions, far fewer than scattered masking would give."""
    m = blockwise_masks(64, (8, 8), (0.3, 0.3), mask_probability=1.0, generator=torch.Generator().manual_seed(1))

    def components(mask):
        grid = mask.view(8, 8).tolist()
        seen, count = set(), 0
        for i in range(8):
            for j in range(8):
                if grid[i][j] and (i, j) not in seen:
                    count += 1
                    stack = [(i, j)]
                    while stack:
                        a, b = stack.pop()
                        if (a, b) in seen or not (0 <= a < 8 and 0 <= b < 8) or not grid[a][b]:
                            continue
                        seen.add((a, b))
                        stack += [(a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)]
        return count

    per_image = [components(row) for row in m]
    assert sum(per_image) / len(per_image) < 3  # ~19 patches in one to a few blocks


def test_deterministic_under_a_seed_and_on_the_device():
    a = blockwise_masks(32, (7, 7), generator=torch.Generator().manual_seed(5))
    b = blockwise_masks(32, (7, 7), generator=torch.Generator().manual_seed(5))
    c = blockwise_masks(32, (7, 7), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(9)
    d = blockwise_masks(32, (7, 7), stratified=True)
    torch.manual_seed(9)
    assert torch.equal(d, blockwise_masks(32, (7, 7), stratified=True))  # the global generator too
    assert blockwise_masks(2, (7, 7), device="meta").device.type == "meta"


@pytest.mark.parametrize("kwargs,match", [
    ({"ratio": (0.0, 0.5)}, r"mask ratio must be in \(0, 1\)"),
    ({"ratio": (0.1, 1.0)}, r"mask ratio must be in \(0, 1\)"),
    ({"ratio": (0.5, 0.1)}, r"0 < low ≤ high < 1"),
    ({"mask_probability": 1.5}, r"mask_probability must be in \[0, 1\]"),
    ({"aspect": (0.0, 2.0)}, "aspect"),
    ({"min_block": 0}, "min_block"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        blockwise_masks(4, (8, 8), **kwargs)
