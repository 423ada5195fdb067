"""Batched image augmentations with per-sample randomness, on whatever device the batch lives.

Every function takes a float batch (B, C, H, W) in [0, 1] and draws one set of random parameters
per sample from torch's global generator, so a whole batch is augmented in a handful of kernel
launches and a resumed run replays the same draws once the RNG state is restored. Parameter
ranges follow SimCLR (Chen et al. 2020, arXiv:2002.05709, appendix A) and torchvision.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _uniform(n: int, low: float, high: float, device: torch.device) -> Tensor:
    return torch.rand(n, device=device) * (high - low) + low


def sample_crop_boxes(n: int, scale: tuple[float, float], ratio: tuple[float, float], device: torch.device,
                      tries: int = 10, aspect: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Crop boxes as fractions of the image: (centre x, centre y, width, height), each (n,).

    As torchvision's ``RandomResizedCrop.get_params``: area fraction s ~ U(scale) and crop aspect
    a ~ logU(ratio) in the image's pixel space; a draw that does not fit is drawn again (up to ``tries``
    rounds), then falls back to the largest centre crop whose aspect is clamped into ``ratio``.

    ``aspect`` (n,) is each image's original width / height ρ when its pixels are the whole image
    squashed to a square (image-folder caches): the box in fractions of the image is then
    w = √(s·a/ρ), h = √(s·ρ/a), so its pixel area is s·W·H and its pixel aspect a, and the same
    fractions on the squashed canvas select exactly that region. ``None`` is ρ = 1 (square images).
    """
    rho = None if aspect is None else aspect.to(device=device, dtype=torch.float32)
    # the fallback: the whole image, or its centre clamped into the ratio range (ρ = 1: whole when 1 ∈ ratio)
    if rho is None:
        w = torch.full((n,), min(1.0, ratio[1]), device=device)
        h = torch.full((n,), min(1.0, 1 / ratio[0]), device=device)
    else:
        w = (ratio[1] / rho).clamp(max=1.0)
        h = (rho / ratio[0]).clamp(max=1.0)
    pending = torch.ones(n, dtype=torch.bool, device=device)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(tries):
        area = _uniform(n, scale[0], scale[1], device)
        crop_aspect = torch.exp(_uniform(n, log_lo, log_hi, device))
        if rho is None:
            cw, ch = torch.sqrt(area * crop_aspect), torch.sqrt(area / crop_aspect)
        else:
            cw, ch = torch.sqrt(area * crop_aspect / rho), torch.sqrt(area * rho / crop_aspect)
        fits = pending & (cw <= 1) & (ch <= 1)
        w, h = torch.where(fits, cw, w), torch.where(fits, ch, h)
        pending = pending & ~fits
    cx = (1 - w) * torch.rand(n, device=device) + w / 2
    cy = (1 - h) * torch.rand(n, device=device) + h / 2
    # the fallback is centred (a no-op for the whole image, where the formula above gives 0.5 already)
    cx, cy = torch.where(pending, 0.5, cx), torch.where(pending, 0.5, cy)
    return cx, cy, w, h


def _box_grid(size: int, cx: Tensor, cy: Tensor, w: Tensor, h: Tensor) -> Tensor:
    """``F.affine_grid`` of axis-aligned boxes (align_corners=False), by broadcasting: x depends only on the
    column and y only on the row, so no (B·size², 3) × (3, 2) product is needed (~20× faster)."""
    base = (torch.arange(size, device=cx.device, dtype=cx.dtype) * 2 + 1) / size - 1  # pixel centres in [-1, 1]
    gx = torch.addcmul((2 * cx - 1)[:, None], w[:, None], base)  # (B, size)
    gy = torch.addcmul((2 * cy - 1)[:, None], h[:, None], base)
    return torch.stack([gx[:, None, :].expand(-1, size, -1), gy[:, :, None].expand(-1, -1, size)], dim=-1)


def _crop_resample(x: Tensor, size: int, cx: Tensor, cy: Tensor, w: Tensor, h: Tensor,
                   affine_grid: bool = False) -> Tensor:
    """Boxes (fractions of the image, (B,) each; a negative width mirrors) resampled to size×size, one
    ``grid_sample`` for the whole batch. ``affine_grid``: build the sampling grid with ``F.affine_grid``
    as the square-image path always has, so its views stay bit-identical to runs recorded before (the
    broadcast grid differs from it by ~1e-7 in the coordinates)."""
    if affine_grid:
        b = x.shape[0]
        theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = w
        theta[:, 0, 2] = 2 * cx - 1
        theta[:, 1, 1] = h
        theta[:, 1, 2] = 2 * cy - 1
        grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    else:
        grid = _box_grid(size, cx.to(x.dtype), cy.to(x.dtype), w.to(x.dtype), h.to(x.dtype))
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def resized_crop_flip(x: Tensor, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                      flip_p: float, aspect: Tensor | None = None, return_box: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Random resized crop to ``size``×``size`` and horizontal flip, as one affine resampling.

    ``aspect`` (B,): original width / height of squashed images (see :func:`sample_crop_boxes`).
    ``return_box``: also return the crops as (B, 4) (centre x, centre y, width, height) fractions of the image,
    the width negative where the view is mirrored: view pixel (u, v) ∈ [0, 1]² shows image point
    (cx + (u − ½)·w, cy + (v − ½)·h)."""
    b = x.shape[0]
    cx, cy, w, h = sample_crop_boxes(b, scale, ratio, x.device, aspect=aspect)
    flip = torch.where(torch.rand(b, device=x.device) < flip_p, -1.0, 1.0)
    out = _crop_resample(x, size, cx, cy, w * flip, h, affine_grid=aspect is None)
    return (out, torch.stack([cx, cy, w * flip, h], dim=1)) if return_box else out


def center_crop(x: Tensor, size: int, aspect: Tensor | None = None) -> Tensor:
    """The centre square of each image in its original pixel space (its shorter side, as "resize the
    short side, centre-crop"), resampled to size×size. ``aspect`` (B,) as in :func:`sample_crop_boxes`;
    ``None``: the images are the whole picture, only resized (a no-op at their own size)."""
    if aspect is None:
        if x.shape[-1] == size and x.shape[-2] == size:
            return x
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    rho = aspect.to(device=x.device, dtype=x.dtype)
    half = torch.full_like(rho, 0.5)
    return _crop_resample(x, size, half, half, (1 / rho).clamp(max=1.0), rho.clamp(max=1.0))


def _luma(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _per_sample(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


# RGB → YIQ (NTSC). A hue shift rotates the (I, Q) chroma plane; folded into RGB it is the per-sample
# matrix  A + cos θ·B + sin θ·C  with A, B, C below, so a batch is rotated by one batched 3×3 product.
_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_HUE_BASES: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _hue_basis(device: torch.device, dtype: torch.dtype) -> Tensor:
    """(3, 3, 3): A, B, C of the hue rotation, made once per device and dtype. A fresh constant per call
    would be a host-to-device copy, which on a GPU waits for the whole stream (and ``linalg.inv`` there
    synchronises too)."""
    key = (device, dtype)
    if key not in _HUE_BASES:
        to_yiq = torch.tensor(_TO_YIQ, dtype=torch.float64)
        from_yiq = torch.linalg.inv(to_yiq)
        keep_y, keep_iq = torch.diag(torch.tensor([1.0, 0, 0], dtype=torch.float64)), torch.diag(
            torch.tensor([0.0, 1, 1], dtype=torch.float64))
        turn = torch.tensor([[0.0, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=torch.float64)
        basis = torch.stack([from_yiq @ m @ to_yiq for m in (keep_y, keep_iq, turn)])
        with torch.inference_mode(False):  # usable outside inference mode too
            _HUE_BASES[key] = basis.to(device=device, dtype=dtype)
    return _HUE_BASES[key]


def _rotate_hue(x: Tensor, angle: Tensor) -> Tensor:
    """Hue shift by ``angle`` (B,) radians: a rotation of the chroma plane in YIQ space, x (B, 3, H, W)."""
    a, b, c = _hue_basis(x.device, x.dtype)
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    m = a + cos * b + sin * c  # (B, 3, 3)
    return torch.bmm(m, x.flatten(2)).view_as(x)


def color_jitter(x: Tensor, p: float, brightness: float, contrast: float, saturation: float, hue: float) -> Tensor:
    """Brightness, contrast, saturation, then hue, each factor drawn per sample; applied with probability p.

    Saturation and hue need colour and are skipped for one-channel images.
    """
    b, dev = x.shape[0], x.device
    on = (torch.rand(b, device=dev) < p).to(x.dtype)

    def factor(strength: float) -> Tensor:
        f = _uniform(b, max(0.0, 1 - strength), 1 + strength, dev)
        return _per_sample(1 + on * (f - 1))

    if brightness > 0:
        x = (x * factor(brightness)).clamp_(0, 1)
    if contrast > 0:
        mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * factor(contrast) + mean).clamp_(0, 1)
    if x.shape[1] == 3 and saturation > 0:
        gray = _luma(x)
        x = ((x - gray) * factor(saturation) + gray).clamp_(0, 1)
    if x.shape[1] == 3 and hue > 0:
        angle = _uniform(b, -hue, hue, dev) * 2 * math.pi * on
        x = _rotate_hue(x, angle).clamp_(0, 1)
    return x


def random_grayscale(x: Tensor, p: float) -> Tensor:
    if x.shape[1] == 1 or p <= 0:
        return x
    on = _per_sample(torch.rand(x.shape[0], device=x.device) < p)
    return torch.where(on, _luma(x).expand_as(x), x)


def gaussian_blur(x: Tensor, p: float, sigma: tuple[float, float], kernel_fraction: float = 0.1) -> Tensor:
    """Separable Gaussian blur, sigma ~ U(sigma) per sample; the kernel spans ~10% of the image (SimCLR)."""
    if p <= 0:
        return x
    b, c, h, w = x.shape
    radius = max(1, int(kernel_fraction * min(h, w)) // 2)
    s = _uniform(b, sigma[0], sigma[1], x.device)
    on = torch.rand(b, device=x.device) < p
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-offsets[None] ** 2 / (2 * s[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (offsets == 0).to(x.dtype).expand(b, -1)
    kernel = torch.where(on[:, None], kernel, identity)  # (B, K)
    k = kernel[:, None].expand(b, c, -1).reshape(b * c, -1)  # (B*C, K), each sample's kernel per channel
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


def solarize(x: Tensor, p: float, threshold: float = 0.5) -> Tensor:
    if p <= 0:
        return x
    on = _per_sample(torch.rand(x.shape[0], device=x.device) < p)
    return torch.where(on & (x >= threshold), 1 - x, x)
