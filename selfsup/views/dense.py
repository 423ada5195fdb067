"""Geometric views that move masks and boxes with the pixels: the dense protocols' training crops and their
evaluation view.

Both resample image records (whole images squashed to S×S, with their aspect ratios; or square images) through
one box per image given as fractions of the image, exactly as :func:`selfsup.views.ops.resized_crop_flip` does:
the image with bilinear sampling, its mask (class ids, :data:`~selfsup.data.dense.IGNORE` = 255) with nearest
sampling on the same grid, and its boxes with the same affine map, so the three stay aligned whatever the crop,
flip or aspect ratio.

- :func:`dense_crop_flip`: a random resized crop (area fraction and aspect ratio drawn in the image's original
  pixel space) and horizontal flip. A box keeps its part inside the crop when at least ``min_visible`` of its
  area is inside (a sliver of an object is not a training target); the others are dropped.
- :func:`letterbox`: the evaluation view: the whole image, its aspect ratio kept, centred on a square and padded
  (image pixels 0, mask pixels ignored), so nothing of the image is cut or distorted. Square images are only
  resized. :func:`unletterbox_boxes` maps view boxes back to the original image's pixels (for COCO scoring).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.data.dense import IGNORE
from selfsup.views.ops import _box_grid, sample_crop_boxes


@dataclass
class DenseViews:
    images: Tensor
    """float (B, C, size, size) in [0, 1] (not normalised)."""
    masks: Tensor | None
    """int64 (B, size, size) class ids, :data:`IGNORE` where no class is scored; None without masks."""
    boxes: list[Tensor]
    """Per image float32 (k, 4) x0, y0, x1, y1 in view pixels."""
    box_index: list[Tensor]
    """Per image int64 (k,): which of the image's boxes each row is (for their labels)."""
    crops: Tensor
    """(B, 4) the crop of each view as (centre x, centre y, width, height) fractions of its image, width negative
    when mirrored."""


def _sample_masks(masks: Tensor, grid: Tensor) -> Tensor:
    """uint8 (B, 1, S, S) → int64 (B, size, size), nearest on ``grid``; outside the image: IGNORE."""
    shifted = masks.to(grid.dtype) + 1  # 0 after sampling marks "outside the image"
    out = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
    out = out.round().long() - 1
    return torch.where(out < 0, IGNORE, out)


def _move_boxes(boxes: list[Tensor], crops: Tensor, size: int, min_visible: float) -> tuple[list[Tensor], list[Tensor]]:
    """Image-fraction boxes → view pixels through each crop (cx, cy, w, h; w < 0 mirrored), clipped to the view;
    boxes with less than ``min_visible`` of their area (in the view) inside it, or under one pixel, dropped."""
    out, kept = [], []
    for b, (cx, cy, w, h) in zip(boxes, crops.tolist()):
        if len(b) == 0:
            out.append(torch.zeros(0, 4))
            kept.append(torch.zeros(0, dtype=torch.long))
            continue
        b = b.to(torch.float32).cpu()
        u = ((b[:, [0, 2]] - cx) / w + 0.5) * size
        v = ((b[:, [1, 3]] - cy) / h + 0.5) * size
        full = torch.stack([u.min(1).values, v.min(1).values, u.max(1).values, v.max(1).values], dim=1)
        clipped = full.clamp(0, size)
        area = lambda t: (t[:, 2] - t[:, 0]).clamp(min=0) * (t[:, 3] - t[:, 1]).clamp(min=0)
        keep = (area(clipped) >= min_visible * area(full)) & ((clipped[:, 2:] - clipped[:, :2]) >= 1).all(1)
        out.append(clipped[keep])
        kept.append(keep.nonzero().flatten())
    return out, kept


def _resample(x: Tensor, masks: Tensor | None, boxes: list[Tensor], crops: Tensor, size: int, padding: str,
              min_visible: float) -> DenseViews:
    cx, cy, w, h = crops.unbind(1)
    grid = _box_grid(size, cx.to(x.dtype), cy.to(x.dtype), w.to(x.dtype), h.to(x.dtype))
    images = F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    out_masks = None if masks is None else _sample_masks(masks.to(x.device), grid)
    moved, index = _move_boxes(boxes, crops, size, min_visible)
    return DenseViews(images, out_masks, moved, index, crops)


def dense_crop_flip(x: Tensor, masks: Tensor | None, boxes: list[Tensor], size: int, scale: tuple[float, float],
                    ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5, aspect: Tensor | None = None,
                    min_visible: float = 0.4) -> DenseViews:
    """Random resized crops and flips of float images ``x`` (B, C, S, S) in [0, 1], their masks (uint8 (B, 1, S, S)
    or None) and boxes (per image (k, 4) fractions), drawn with torch's global generator."""
    b = x.shape[0]
    cx, cy, w, h = sample_crop_boxes(b, scale, ratio, x.device, aspect=aspect)
    flip = torch.where(torch.rand(b, device=x.device) < flip_p, -1.0, 1.0)
    return _resample(x, masks, boxes, torch.stack([cx, cy, w * flip, h], dim=1), size, "reflection", min_visible)


def letterbox_crops(n: int, aspect: Tensor | None, device: torch.device | str = "cpu") -> Tensor:
    """(n, 4) crops that show each whole image centred on a square: a wide image (aspect ρ = W/H > 1) spans the
    square's width and ρ times its own height, a tall one the reverse."""
    rho = torch.ones(n, device=device) if aspect is None else aspect.to(device=device, dtype=torch.float32)
    half = torch.full_like(rho, 0.5)
    return torch.stack([half, half, (1 / rho).clamp(min=1.0), rho.clamp(min=1.0)], dim=1)


def letterbox(x: Tensor, masks: Tensor | None, boxes: list[Tensor], size: int, aspect: Tensor | None) -> DenseViews:
    """The evaluation view (module docstring); every box is kept (none can leave the image)."""
    if aspect is None and x.shape[-1] == size:
        crops = letterbox_crops(x.shape[0], None, x.device)
        moved, index = _move_boxes(boxes, crops, size, 0.0)
        out_masks = None if masks is None else masks[:, 0].long().to(x.device)
        return DenseViews(x, out_masks, moved, index, crops)
    return _resample(x, masks, boxes, letterbox_crops(x.shape[0], aspect, x.device), size, "zeros", 0.0)


def unletterbox_boxes(boxes: Tensor, crop: Tensor, size: int, width: int, height: int) -> Tensor:
    """View-pixel boxes (k, 4) of one letterboxed image → its original pixels (the inverse of the box move)."""
    cx, cy, w, h = crop.tolist()
    x = ((boxes[:, [0, 2]] / size - 0.5) * w + cx) * width
    y = ((boxes[:, [1, 3]] / size - 0.5) * h + cy) * height
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1).clamp(min=0).clamp(
        max=torch.tensor([width, height, width, height], dtype=boxes.dtype))
