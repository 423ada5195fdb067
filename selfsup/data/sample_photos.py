"""Random crops of scikit-learn's two bundled sample photographs: a tiny RGB dataset that needs no download.

``sklearn.datasets.load_sample_images`` ships ``china.jpg`` and ``flower.jpg`` (427×640 RGB). Crops are
taken at a few scales (windows of 2–4× the output side, each photo area-downsampled once per scale) at
random positions; the label is the photo a crop came from. Crops of one photo overlap, so this is a
demonstration set for colour-dependent methods (colorization), not a benchmark.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from selfsup.data.imageset import ImageSet

SCALES = (2, 3, 4)
"""Crop window side as a multiple of the output side."""


def sample_photo_crops(n: int, size: int = 32, seed: int = 0) -> ImageSet:
    """``n`` random ``size``×``size`` RGB crops (uint8 (n, 3, size, size)), labels 0 = china, 1 = flower."""
    from sklearn.datasets import load_sample_images

    if n < 1:
        raise ValueError(f"sample-photos: need at least one crop, got n={n}")
    bundle = load_sample_images()
    names = [name.rsplit("/", 1)[-1].removesuffix(".jpg") for name in bundle.filenames]
    photos = [torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() for img in bundle.images]
    smallest = min(min(p.shape[-2:]) for p in photos)
    if size > smallest:
        raise ValueError(f"sample-photos: crops of {size} px do not fit the {smallest} px photos")
    scales = [s for s in SCALES if size * s <= smallest] or [1]
    g = torch.Generator().manual_seed(seed)
    photo = torch.randint(len(photos), (n,), generator=g)
    level = torch.randint(len(scales), (n,), generator=g)
    u = torch.rand(n, 2, generator=g)
    crops = torch.empty(n, 3, size, size, dtype=torch.uint8)
    span = torch.arange(size)
    for p, full in enumerate(photos):
        for lv, s in enumerate(scales):
            # One area-downsampled copy per photo and scale; its crops are then one gather.
            src = F.interpolate(full, scale_factor=1 / s, mode="area")[0] if s > 1 else full[0]
            src = src.round().clamp(0, 255).to(torch.uint8)
            pick = ((photo == p) & (level == lv)).nonzero().squeeze(1)
            top = (u[pick, 0] * (src.shape[-2] - size + 1)).long()
            left = (u[pick, 1] * (src.shape[-1] - size + 1)).long()
            rows, cols = top[:, None] + span, left[:, None] + span  # (k, size)
            crops[pick] = src[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)
    return ImageSet(crops, photo.long(), names, "sample-photos")
