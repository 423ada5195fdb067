"""The raw-pixel baseline: the evaluation view, area-averaged to at most 32×32, so large folders fit in memory."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.data.imageset import ImageSet
from selfsup.monitor.features import RAW_PIXELS_MAX_SIDE, pixel_features


def test_small_images_are_their_own_pixels():
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    feats = pixel_features(ImageSet(images), [0.5], [0.25])
    assert torch.allclose(feats, ((images.float() / 255 - 0.5) / 0.25).flatten(1), atol=1e-6)


def test_large_images_are_averaged_down_to_the_cap():
    images = torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8)
    feats = pixel_features(ImageSet(images), [0.5] * 3, [0.25] * 3)
    side = RAW_PIXELS_MAX_SIDE
    assert feats.shape == (3, 3 * side * side)
    pooled = F.avg_pool2d(images.float() / 255, 96 // side)  # 3×3 blocks: what area averaging means here
    assert torch.allclose(feats, ((pooled - 0.5) / 0.25).flatten(1), atol=1e-5)
