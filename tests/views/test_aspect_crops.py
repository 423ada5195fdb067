"""Aspect-aware crops of squashed images: the same boxes as torchvision's RandomResizedCrop on the original.

Image-folder caches store each image squashed to S×S with its original aspect ratio ρ = W/H beside
it; crops are drawn in the original pixel space. Checked here: ``aspect=None`` is bit-identical to the
square-image code it extends; with aspects, the crop statistics match ``RandomResizedCrop.get_params``
on an image of that aspect; and a crop of the squashed canvas shows what torchvision's crop of the
original shows.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF

from selfsup.views import ViewRecipe, center_view, make_views, resolve_sizes
from selfsup.views.ops import _crop_resample, resized_crop_flip, sample_crop_boxes

DRAWS = 20000
KS_TOLERANCE = 0.025
"""Two-sample Kolmogorov–Smirnov distance allowed between 20,000 draws of each (values binned to 0.01): the
0.1% critical value is 1.95·√(2/20000) = 0.0195; the rest covers torchvision's rounding to whole pixels."""


# ---------------------------------------------------------- the square-image code before aspects (frozen copy)


def _old_sample_crop_boxes(n, scale, ratio, device, tries=10):
    w = torch.ones(n, device=device)
    h = torch.ones(n, device=device)
    pending = torch.ones(n, dtype=torch.bool, device=device)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(tries):
        area = torch.rand(n, device=device) * (scale[1] - scale[0]) + scale[0]
        aspect = torch.exp(torch.rand(n, device=device) * (log_hi - log_lo) + log_lo)
        cw, ch = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
        fits = pending & (cw <= 1) & (ch <= 1)
        w, h = torch.where(fits, cw, w), torch.where(fits, ch, h)
        pending = pending & ~fits
    cx = (1 - w) * torch.rand(n, device=device) + w / 2
    cy = (1 - h) * torch.rand(n, device=device) + h / 2
    return cx, cy, w, h


def _old_resized_crop_flip(x, size, scale, ratio, flip_p):
    b = x.shape[0]
    cx, cy, w, h = _old_sample_crop_boxes(b, scale, ratio, x.device)
    flip = torch.where(torch.rand(b, device=x.device) < flip_p, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = 2 * cx - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * cy - 1
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@pytest.mark.parametrize("scale, ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.05, 0.4), (3 / 4, 4 / 3)),
                                          ((1.0, 1.0), (1.0, 1.0)), ((0.9, 1.0), (0.5, 2.0))])
def test_without_aspects_crops_are_bit_identical_to_the_square_code(scale, ratio):
    x = torch.rand(64, 3, 20, 20)
    torch.manual_seed(5)
    old = _old_resized_crop_flip(x, 12, scale, ratio, 0.5)
    torch.manual_seed(5)
    new = resized_crop_flip(x, 12, scale, ratio, 0.5, aspect=None)
    assert torch.equal(old, new)
    torch.manual_seed(7)
    old_boxes = _old_sample_crop_boxes(DRAWS, scale, ratio, torch.device("cpu"))
    torch.manual_seed(7)
    new_boxes = sample_crop_boxes(DRAWS, scale, ratio, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(old_boxes, new_boxes))


def test_make_views_without_aspects_is_unchanged_and_with_aspects_runs():
    batch = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8)
    recipe = resolve_sizes(ViewRecipe(), 16)
    torch.manual_seed(1)
    a = make_views(batch, recipe, [0.5] * 3, [0.25] * 3)
    torch.manual_seed(1)
    b = make_views(batch, recipe, [0.5] * 3, [0.25] * 3, aspect=None)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    views = make_views(batch, recipe, [0.5] * 3, [0.25] * 3, aspect=torch.tensor([0.5, 1.0, 4 / 3, 2.0, 3.0, 1 / 3]))
    assert [v.shape for v in views] == [(6, 3, 16, 16)] * 2 and all(torch.isfinite(v).all() for v in views)


# ------------------------------------------------------------------------ statistics against torchvision


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov distance at a resolution of 0.01: torchvision rounds boxes to whole
    pixels, which moves a point mass (the fallback crop) by ~1e-3, and KS would count the whole mass."""
    a, b = np.round(a, 2), np.round(b, 2)
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def _torchvision_boxes(width: int, height: int, scale, ratio, n: int) -> dict[str, np.ndarray]:
    """``RandomResizedCrop.get_params`` on a W×H image, n draws: area fraction, pixel aspect, centre."""
    img = torch.zeros(1, height, width)
    torch.manual_seed(0)
    boxes = np.array([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)], dtype=np.float64)
    top, left, h, w = boxes.T
    return {"area": w * h / (width * height), "aspect": w / h, "cx": (left + w / 2) / width,
            "cy": (top + h / 2) / height}


def _our_boxes(rho: float, scale, ratio, n: int) -> dict[str, np.ndarray]:
    torch.manual_seed(1)
    cx, cy, w, h = (t.double().numpy() for t in sample_crop_boxes(n, scale, ratio, torch.device("cpu"),
                                                                     aspect=torch.full((n,), rho)))
    return {"area": w * h, "aspect": w / h * rho, "cx": cx, "cy": cy}


@pytest.mark.parametrize("width, height", [(1000, 1000), (1000, 750), (750, 1000), (1500, 500)])
@pytest.mark.parametrize("scale, ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.05, 0.4), (3 / 4, 4 / 3))])
def test_crop_statistics_match_torchvision_random_resized_crop(width, height, scale, ratio):
    """Area fraction, pixel aspect and centre of the crops, over 20,000 draws each, have the same
    distributions (KS distance ≤ 0.025) as torchvision's on an image of the same size; the fallback
    (a draw that never fit: the largest centre crop with its aspect clamped into ``ratio``) happens
    equally often (±1.5 points)."""
    ours = _our_boxes(width / height, scale, ratio, DRAWS)
    theirs = _torchvision_boxes(width, height, scale, ratio, DRAWS)
    for key in ("area", "aspect", "cx", "cy"):
        assert _ks(ours[key], theirs[key]) < KS_TOLERANCE, key
    assert (ours["aspect"] >= ratio[0] - 1e-4).all() and (ours["aspect"] <= ratio[1] + 1e-4).all()
    centred = lambda b: np.mean((np.abs(b["cx"] - 0.5) < 1e-3) & (np.abs(b["cy"] - 0.5) < 1e-3)
                                & (b["area"] > scale[1] - 1e-9))
    assert abs(centred(ours) - centred(theirs)) < 0.015


def test_fallback_is_torchvisions_clamped_centre_crop():
    """A crop that can never fit (scale 1 on a 3:1 image) falls back to the centre 4:3 region at full height
    (on a 1:3 image the centre 3:4 region at full width), as torchvision's."""
    rho = torch.tensor([3.0, 1 / 3, 1.0])
    cx, cy, w, h = sample_crop_boxes(3, (1.0, 1.0), (3 / 4, 4 / 3), torch.device("cpu"), aspect=rho)
    torch.testing.assert_close(w, torch.tensor([4 / 9, 1.0, 1.0]))
    torch.testing.assert_close(h, torch.tensor([1.0, 4 / 9, 1.0]))
    torch.testing.assert_close(cx, torch.full((3,), 0.5))
    torch.testing.assert_close(cy, torch.full((3,), 0.5))
    for (width, height), got_w, got_h in zip([(1200, 400), (400, 1200), (500, 500)], w.tolist(), h.tolist()):
        top, left, th, tw = RandomResizedCrop.get_params(torch.zeros(1, height, width), [1.0, 1.0], [3 / 4, 4 / 3])
        assert abs(tw / width - got_w) < 2e-3 and abs(th / height - got_h) < 2e-3


# -------------------------------------------------------------------- pixels: squashed canvas vs original


def _smooth_photo(width: int, height: int) -> Image.Image:
    """A smooth RGB image (low frequencies only), so resampling differences stay small."""
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(height, width), mode="bicubic", align_corners=False)
    return Image.fromarray((x[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def test_a_crop_of_the_squashed_canvas_shows_torchvisions_crop_of_the_original():
    width, height, stored, out = 480, 320, 256, 48
    photo = _smooth_photo(width, height)
    canvas = TF.to_tensor(photo.resize((stored, stored), Image.BICUBIC))[None]
    rho = torch.tensor([width / height])
    torch.manual_seed(3)
    for _ in range(20):
        cx, cy, w, h = sample_crop_boxes(1, (0.08, 1.0), (3 / 4, 4 / 3), torch.device("cpu"), aspect=rho)
        ours = _crop_resample(canvas, out, cx, cy, w, h)[0]
        left, top = float((cx - w / 2) * width), float((cy - h / 2) * height)
        ref = TF.resized_crop(TF.to_tensor(photo), round(top), round(left), round(float(h * height)),
                              round(float(w * width)), [out, out], antialias=True)
        assert (ours - ref).abs().mean() < 0.02


def test_center_view_is_resize_short_side_then_centre_crop():
    width, height, stored, out = 480, 320, 256, 48
    photo = _smooth_photo(width, height)
    canvas = torch.from_numpy(np.array(photo.resize((stored, stored), Image.BICUBIC))).permute(2, 0, 1)[None]
    ours = center_view(canvas, torch.tensor([width / height]), out)[0]
    ref = TF.center_crop(TF.resize(TF.to_tensor(photo), out, antialias=True), out)
    assert ours.shape == (3, out, out) and (ours - ref).abs().mean() < 0.02
    tall = center_view(canvas.transpose(-1, -2), torch.tensor([height / width]), out)[0]
    assert (tall - ref.transpose(-1, -2)).abs().mean() < 0.02
    # without aspects (in-memory datasets) the view is the image itself at its own size
    same = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(center_view(same, None, 28), same.float() / 255)


def test_the_broadcast_grid_of_aspect_crops_is_affine_grids():
    """Crops with aspects build their sampling grid by broadcasting (axis-aligned boxes); it is
    ``F.affine_grid``'s to float rounding."""
    from selfsup.views.ops import _box_grid

    g = torch.Generator().manual_seed(0)
    cx, cy = torch.rand(16, generator=g), torch.rand(16, generator=g)
    w = (torch.rand(16, generator=g) * 0.9 + 0.1) * torch.where(torch.rand(16, generator=g) < 0.5, -1.0, 1.0)
    h = torch.rand(16, generator=g) * 0.9 + 0.1
    theta = torch.zeros(16, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, 2 * cx - 1, h, 2 * cy - 1
    torch.testing.assert_close(_box_grid(24, cx, cy, w, h), F.affine_grid(theta, [16, 3, 24, 24], align_corners=False),
                               atol=1e-6, rtol=0)
