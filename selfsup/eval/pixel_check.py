"""A pixel-level second opinion on near-duplicate candidates: the correlation of the two images' grey thumbnails.

An encoder that learnt little (too few steps) or collapsed maps many unlike images to nearly one point, and then
every pair of them passes any embedding threshold: on a real clip-art folder a 36-step encoder put 491 unrelated
images into one "group". Pixels cannot be fooled that way, so every pair the embedding proposes must also look
alike: the zero-normalised cross-correlation (Pearson's r over pixels) of the two images' 32×32 grey thumbnails
must reach :data:`MIN_CORRELATION`.

Why correlation, not a perceptual hash or SSIM (measured on the candidate pairs of a 36-step and a 360-step encoder
on 1,165 clip-art images with 120 planted groups, ``benchmarks/duplicates/README.md``): clip art is mostly small
drawings on white, and two different small drawings on white agree on every flat white pixel. ``imagehash``'s dHash
then differs in few bits (flat rows give 0 bits in both: unrelated candidates came within 4–6 bits, planted copies
went up to 8) and pHash worse (copies up to 23 bits); scikit-image's SSIM is high (flat windows have structure 1:
unrelated candidates reached 0.93, planted copies went down to 0.85). The correlation subtracts each thumbnail's mean
and divides by its spread, so what it compares is the drawing itself: planted pairs ≥ 0.98, unrelated candidates
≤ 0.92, none of 116,550 candidates of the weak encoder passing 0.95. It is also invariant to brightness and contrast
(a re-encoded or brightened copy), needs no dependency beyond torch, and costs one batched resize per image and a
dot product per pair: 160,000 candidate pairs in ~4 s on one core.

A 90 % centre crop shifts and scales every pixel of a thumbnail, so each image is also compared as its own 90 %
centre crop, and as the mirror image of both (a left-right flip is a copy for training and for a clip-art library):
the score of a pair is the largest over (a, b), (crop a, b), (a, crop b), each with b mirrored or not. Grey: a
recoloured copy counts as a copy.

The thumbnails come from the folder cache's records (each image squashed to S×S; both images of a pair are squashed
alike, so the comparison holds) when they have ≥ :data:`MIN_RECORD_SIDE` px: records of 64 and 85 px (encoders of 48
and 64 px) gave the decoded files' figures, 43 px records (a 32 px encoder) lost two planted pairs (0.94: a 43 → 32
resize blurs unevenly). Smaller records are decoded again from their files, the candidates only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.data.decode import Unreadable, decode_image
from selfsup.data.imageset import DataError, ImageSet, convert_channels

MIN_CORRELATION = 0.95
"""The thumbnail correlation two near-duplicates reach (see the module docstring)."""
SIDE = 32
CROP = 0.9
MIN_RECORD_SIDE = 2 * SIDE
"""Records smaller than this make worse thumbnails than the files (measured: see the module docstring); their files
are decoded again at :data:`DECODE_SIDE`, the candidates only."""
DECODE_SIDE = 64
FLAT = 1.0
"""A thumbnail whose pixels vary by less than this (std, grey levels) is flat: it has no drawing to correlate. Two
flat ones match when their grey levels are within :data:`FLAT_MEAN`; a flat one matches nothing else."""
FLAT_MEAN = 8.0
CHUNK = 1024
PAIR_CHUNK = 4096
COMBOS = ((0, 0), (1, 0), (0, 1), (0, 2), (1, 2), (0, 3))
"""Variant pairs compared, of (0 whole, 1 crop, 2 mirror, 3 mirrored crop): (a, b), (crop a, b), (a, crop b), and
the same against mirrored b."""


@dataclass(frozen=True)
class PixelCheck:
    """How candidate pairs are verified: thumbnail correlation ≥ ``min_correlation`` over the variants above."""

    min_correlation: float = MIN_CORRELATION
    mirror: bool = True
    """Also compare each image with the other's mirror image."""
    crop: float = CROP
    side: int = SIDE

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_correlation <= 1.0:
            raise DataError(f"--pixel-threshold is a correlation in [-1, 1], got {self.min_correlation}")
        if not 0.5 <= self.crop <= 1.0:
            raise ValueError(f"crop must be in [0.5, 1], got {self.crop}")

    def describe(self) -> str:
        return (f"grey {self.side}×{self.side} thumbnails correlate ≥ {self.min_correlation:g} (whole or "
                f"{self.crop:.0%} centre crop{', mirrored or not' if self.mirror else ''})")


def _records(images: ImageSet, index: list[int]) -> Tensor:
    """uint8 (B, C, S, S) records of the images at ``index`` (ascending); decoded again from their files when the
    cache's records are smaller than :data:`MIN_RECORD_SIDE`."""
    if images.stored_size >= MIN_RECORD_SIDE or images.paths is None:
        return images.batch(index)
    out = []
    for i in index:
        try:
            decoded = decode_image(images.paths[i], DECODE_SIDE)
        except Unreadable as exc:
            raise DataError(f"{images.paths[i]} could not be read again for the pixel check ({exc}); it changed "
                            "since the folder's cache was built: run the command again") from None
        out.append(convert_channels(torch.from_numpy(decoded.pixels).permute(2, 0, 1)[None], 3))
    return torch.cat(out)


def thumbnails(records: Tensor, check: PixelCheck = PixelCheck()) -> Tensor:
    """uint8 (B, 4, side·side) grey thumbnails of records (B, C, S, S): whole, centre crop, and the mirror images
    of both (the plain ones again when ``check.mirror`` is off). Antialiased bilinear resizing."""
    grey = records.float() if records.shape[1] == 1 else convert_channels(records, 1).float()
    s = grey.shape[-1]
    m = round(s * (1 - check.crop) / 2)
    size = (check.side, check.side)
    full = F.interpolate(grey, size=size, mode="bilinear", antialias=True, align_corners=False)
    crop = F.interpolate(grey[..., m : s - m, m : s - m], size=size, mode="bilinear", antialias=True,
                         align_corners=False)
    flip = (lambda t: t.flip(-1)) if check.mirror else (lambda t: t)
    stack = torch.cat([full, crop, flip(full), flip(crop)], dim=1)  # (B, 4, side, side)
    return stack.round().clamp(0, 255).to(torch.uint8).flatten(2)


def _standardised(thumbs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(float16 unit-norm centred rows, flat mask, means) of uint8 thumbnails (U, 4, D), once per image: half
    precision halves the memory of a large candidate set and moves a correlation by ~1e-4, far below the margins."""
    unit, flat, mean = [], [], []
    for start in range(0, len(thumbs), CHUNK):
        x = thumbs[start : start + CHUNK].float()
        m = x.mean(dim=-1, keepdim=True)
        x = x - m
        flat.append(x.pow(2).mean(dim=-1).sqrt() < FLAT)
        unit.append((x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)).half())
        mean.append(m.squeeze(-1))
    return torch.cat(unit), torch.cat(flat), torch.cat(mean)


def pair_correlations(thumbs: Tensor, rows: Tensor) -> Tensor:
    """(P,) the largest correlation over :data:`COMBOS` for pairs ``rows`` (P, 2) of rows of thumbs (U, 4, D)."""
    unit, flat, mean = _standardised(thumbs)
    va, vb = torch.tensor([c[0] for c in COMBOS]), torch.tensor([c[1] for c in COMBOS])
    best = torch.empty(len(rows))
    for start in range(0, len(rows), PAIR_CHUNK):  # (chunk, 4, D) per side: bounded memory for any P
        i, j = rows[start : start + PAIR_CHUNK, 0], rows[start : start + PAIR_CHUNK, 1]
        corr = torch.bmm(unit[i].float(), unit[j].float().transpose(1, 2))[:, va, vb]  # (chunk, len(COMBOS))
        fa, fb = flat[i][:, va], flat[j][:, vb]
        same_grey = (mean[i][:, va] - mean[j][:, vb]).abs() <= FLAT_MEAN
        corr = torch.where(fa | fb, (fa & fb & same_grey).float(), corr)  # flat: 1 for the same grey, else 0
        best[start : start + PAIR_CHUNK] = corr.max(dim=1).values
    return best


@torch.no_grad()
def pixel_similarity(images: ImageSet, pairs: Tensor, check: PixelCheck = PixelCheck()) -> Tensor:
    """(P,) thumbnail correlations of pairs (P, 2) of positions in ``images`` (see the module docstring); each image
    in a pair is read and shrunk once."""
    if len(pairs) == 0:
        return torch.zeros(0)
    index = torch.unique(pairs.flatten())
    thumbs = torch.cat([thumbnails(_records(images, index[s : s + CHUNK].tolist()), check)
                        for s in range(0, len(index), CHUNK)])
    where = torch.full((int(index.max()) + 1,), -1, dtype=torch.long)
    where[index] = torch.arange(len(index))
    return pair_correlations(thumbs, where[pairs])


def verify_pairs(images: ImageSet, pairs: Tensor, check: PixelCheck = PixelCheck()) -> tuple[Tensor, Tensor]:
    """((P,) bool: the pair passes the pixel check, (P,) its thumbnail correlation) for pairs (P, 2) of positions."""
    score = pixel_similarity(images, pairs, check)
    return score >= check.min_correlation, score

