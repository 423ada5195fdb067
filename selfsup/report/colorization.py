"""Colorization pictures: grey inputs, the model's colours, and the originals (Zhang et al. 2016, arXiv:1603.08511).

One column per image; rows:
1. the grey input the backbone saw (its standardised luminance, rescaled to the pixel range);
2. the prediction: low-resolution predicted chroma, upsampled bilinearly and merged with the full-resolution
   luminance (as the paper combines its 1/4-resolution ab with the input L);
3. the ceiling at the model's output resolution: the original's chroma area-averaged to ``out_size`` and
   merged the same way (what a perfect prediction would show);
4. the original.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.monitor.features import eval_mode
from selfsup.methods.colorization import LUMA, merge_chroma, split_chroma
from selfsup.report.reconstructions import save_reconstruction_grid, unnormalize
from selfsup.views import normalize, to_float

FILENAME = "colorization.png"
ROWS = ("grey input", "prediction", "original chroma\nat output res.", "original")


@torch.no_grad()
def colorization_rows(model: nn.Module, images: Tensor, mean: Sequence[float], std: Sequence[float]) -> list[Tensor]:
    """The four rows (each (N, C, H, W) in [0, 1]) for uint8 or [0, 1] RGB ``images`` (N, 3, H, W)."""
    device = next(model.parameters()).device
    x = normalize(to_float(images.to(device)), mean, std)
    y, uv = split_chroma(x)
    with eval_mode(model):
        pred_uv, _ = model.predict_chroma(y)
    size = x.shape[-2:]
    up = lambda c: F.interpolate(c, size=size, mode="bilinear", align_corners=False)  # noqa: E731
    ceiling_uv = up(F.adaptive_avg_pool2d(uv, pred_uv.shape[-1]))
    # The grey input in the pixel range: standardised luminance times the luma-weighted std, plus mean.
    grey_mean = sum(w * m for w, m in zip(LUMA, mean))
    grey_std = sum(w * s for w, s in zip(LUMA, std))
    grey = (y * grey_std + grey_mean).clamp(0, 1)
    return [grey, unnormalize(merge_chroma(y, up(pred_uv)), mean, std),
            unnormalize(merge_chroma(y, ceiling_uv), mean, std), unnormalize(x, mean, std)]


def save_colorization_grid(model: nn.Module, images: Tensor, mean: Sequence[float], std: Sequence[float],
                           path: str | Path, title: str | None = None) -> Path:
    """Save the grid for a colorization ``model`` on RGB ``images`` (N, 3, H, W) as a PNG; returns the path."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"colorization pictures need RGB images (N, 3, H, W), got {tuple(images.shape)}")
    return save_reconstruction_grid(colorization_rows(model, images, mean, std), ROWS, path, title)
