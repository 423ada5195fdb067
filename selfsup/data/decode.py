"""One image file → one fixed-size cache record: the whole image squashed to S×S, and its aspect ratio.

The record keeps every pixel of the image (nothing is cropped away) so a random-resized crop can
later be drawn anywhere in it; the original aspect ratio ρ = W/H is returned beside it so crops
and centre views can be placed in the original image's pixel space (:mod:`selfsup.views.ops`).
Images more elongated than :data:`MAX_ASPECT` (panoramas, strips) are first centre-cropped to that
aspect: squashing a 10:1 strip into a square would leave a crop nothing recognisable.

Any PIL mode becomes 8-bit grayscale or RGB (palette, 16-bit, CMYK, alpha composited on white,
bilevel), turned upright by its EXIF orientation (the aspect ratio then is the upright picture's).
Large images are decoded *reduced* instead of refused: JPEGs are decoded directly at
1/2, 1/4 or 1/8 scale (``Image.draft``, libjpeg's DCT scaling), and every resize first reduces by
an integer factor (``reducing_gap``), so a 50-megapixel photo costs little more than a small one.
PIL's decompression-bomb limit is raised only for files above it, only while such a file is
decoded, and only up to :data:`JPEG_PIXEL_CAP` / :data:`PIXEL_CAP` (what one reduced decode can
hold in memory). Files that cannot be used raise :class:`Unreadable` with a short reason.

HEIC/HEIF (phones' default photo format) is read through pi-heif where it is installed (``pip install
'selfsup[heif]'``, which ``make setup`` does): pillow-heif's decoder-only build, libheif and libde265 (LGPL) without
the GPL x265 encoder, which reading does not need. It hands PIL the picture already upright and 8-bit. Without it
each such file is skipped with a reason that says so.
"""
from __future__ import annotations

import math
import os
import threading
import warnings
from contextlib import contextmanager
from functools import lru_cache
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is skipped, never half-decoded

MAX_ASPECT = 3.0
"""Images wider than 3:1 (or taller than 1:3) are centre-cropped to 3:1 before squashing."""
PIXEL_CAP = 2**28
"""268 megapixels (3× PIL's default bomb warning at 89 MP): the largest non-JPEG decoded. Such formats
decode whole, so this bounds one worker's memory to ~1 GiB (RGBA)."""
JPEG_PIXEL_CAP = 2**30
"""1.07 gigapixels (e.g. 32768²): JPEGs decode at ≤ 1/8 scale via ``draft``, so ~17 MP (50 MB) in memory."""
DECODER_VERSION = 2
"""Raised whenever the decoder learns to read files an earlier one could not (2: 16-bit images larger than 3× the
record, which PIL's box reduce refused). A cache built by an older decoder retries the files it skipped with a
``decode error``, and any cache the HEIC files it skipped for want of pi-heif once pi-heif is there
(:meth:`selfsup.data.manifest.Manifest.retryable`); other skips (empty, truncated, not an image) stand."""
RESIZE_GAP = 3.0
"""``Image.resize(reducing_gap=3)``: box-reduce by an integer factor first, then bicubic for the rest;
PIL documents 3.0 as indistinguishable from a full bicubic resize, at a fraction of the time."""
_EXIF_ORIENTATION = 0x0112
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}
"""EXIF orientation → the transpose that shows the picture upright (as ``ImageOps.exif_transpose``)."""
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_bomb_lock = threading.Lock()


class Unreadable(Exception):
    """A file that cannot be used as an image; ``str(exc)`` is ``"<kind>: <detail>"``."""


@dataclass
class Decoded:
    pixels: np.ndarray
    """uint8 (S, S, C), C = 1 (grayscale) or 3 (RGB)."""
    width: int
    """Original width and height in pixels (before any crop or reduction)."""
    height: int
    aspect: float
    """Width / height of the content the record holds (the original's, or :data:`MAX_ASPECT` when clamped)."""

    @property
    def gray(self) -> bool:
        return self.pixels.shape[2] == 1


def to_8bit(img: Image.Image, sixteen_bit: bool = False) -> tuple[np.ndarray, bool]:
    """(H, W, C) uint8 and whether the image is grayscale; C = 1 for grayscale, else 3. ``sixteen_bit``: an
    integer image (mode ``I``) that was 16-bit when read, so its full scale is 65,535 even where it is dark."""
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        a = np.asarray(img, dtype=np.float32)
        wide = sixteen_bit or mode.startswith("I;16") or a.max() > 255
        lo, hi = (0.0, 65535.0) if wide else (0.0, 255.0)
        if mode == "F":
            lo, hi = float(a.min()), float(a.max()) if a.max() > a.min() else float(a.min()) + 1
        a = np.clip((a - lo) / (hi - lo) * 255.0, 0, 255).round().astype(np.uint8)
        return a[:, :, None], True
    if mode in ("1", "L"):
        return np.asarray(img.convert("L"))[:, :, None], True
    if mode in ("LA", "PA", "RGBA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
        if mode == "LA":
            return np.asarray(rgb.convert("L"))[:, :, None], True
        return np.asarray(rgb), False
    return np.asarray(img.convert("RGB")), False


def content_box(width: int, height: int, max_aspect: float = MAX_ASPECT) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the part of a W×H image that is stored: all of it, or its centre
    clamped to ``max_aspect``."""
    if width > max_aspect * height:
        w = max_aspect * height
        return ((width - w) / 2, 0.0, (width + w) / 2, float(height))
    if height > max_aspect * width:
        h = max_aspect * width
        return (0.0, (height - h) / 2, float(width), (height + h) / 2)
    return (0.0, 0.0, float(width), float(height))


@contextmanager
def _bomb_limit(pixels: int) -> Iterator[None]:
    """PIL's bomb check at ``pixels`` (warnings raised as errors) for one decode; restored after. The
    lock keeps concurrent threads from restoring each other's limit and bounds memory: one huge decode
    at a time per process."""
    with _bomb_lock:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _classify(exc: BaseException) -> Unreadable:
    if isinstance(exc, Unreadable):
        return exc
    if isinstance(exc, PermissionError):
        return Unreadable("permission denied: the file cannot be opened for reading")
    if isinstance(exc, UnidentifiedImageError):
        return Unreadable("not an image: PIL cannot identify the file's format")
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return Unreadable(f"too large: {exc}")
    text = str(exc)
    if "truncated" in text or "broken data stream" in text or isinstance(exc, EOFError):
        return Unreadable(f"truncated: {text}")
    if isinstance(exc, MemoryError):
        return Unreadable("out of memory while decoding")
    return Unreadable(f"decode error: {type(exc).__name__}: {text}")


HEIF_SUFFIXES = (".heic", ".heif")
HEIF_MISSING = "HEIC/HEIF needs pi-heif, which is not installed"


@lru_cache(maxsize=None)
def heif_readable() -> bool:
    """Whether PIL can open HEIC/HEIF files: pi-heif installed (its opener registered on the first call)."""
    try:
        from pi_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def decode_image(path: str | Path, size: int, max_aspect: float = MAX_ASPECT) -> Decoded:
    """``path`` as an S×S record (``size`` = S) with its aspect ratio; raises :class:`Unreadable`."""
    try:
        if os.stat(path).st_size == 0:
            raise Unreadable("empty file: zero bytes")
        if str(path).lower().endswith(HEIF_SUFFIXES) and not heif_readable():
            raise Unreadable(f"{HEIF_MISSING}: pip install 'selfsup[heif]'")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return _decode(path, size, max_aspect)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            # a legitimate large image: decoded reduced, with the limit raised to the cap for this file only
            with _bomb_limit(max(PIXEL_CAP, JPEG_PIXEL_CAP)), warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return _decode(path, size, max_aspect, large=True)
    except Exception as exc:  # PIL raises many types for broken files; every one means "skip this file"
        raise _classify(exc) from None


def _decode(path: str | Path, size: int, max_aspect: float, large: bool = False) -> Decoded:
    with Image.open(path) as img:
        width, height = img.size
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # a damaged EXIF block does not make the pixels unusable
            orientation = 1
        if large:
            cap = JPEG_PIXEL_CAP if img.format == "JPEG" else PIXEL_CAP
            if width * height > cap:
                raise Unreadable(f"too large: {width}×{height} = {width * height:,} pixels is over the "
                                 f"{cap:,}-pixel cap for {img.format or 'this format'} files")
        box = content_box(width, height, max_aspect)
        shorter = min(box[2] - box[0], box[3] - box[1])
        # JPEG only: decode at the smallest 1/2^k scale whose content box still has ≥ S pixels per side
        need = math.ceil(size * width / shorter), math.ceil(size * height / shorter)
        if img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK") and (need[0] < width or need[1] < height):
            img.draft(img.mode, need)
        img.load()
        scale_x, scale_y = img.size[0] / width, img.size[1] / height
        box = (box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y)
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif img.mode == "1":
            img = img.convert("L")  # bicubic needs gray levels; nearest-neighbour bilevel would alias
        elif img.mode == "PA":
            img = img.convert("RGBA")
        sixteen_bit = img.mode.startswith("I;16")
        if sixteen_bit:  # PIL's box reduce (resize's reducing_gap) has no 16-bit kernel: "image has wrong mode"
            img = img.convert("I")
        img = img.resize((size, size), Image.BICUBIC, box=box, reducing_gap=RESIZE_GAP)
        turn = _ORIENTATION.get(orientation)
        if turn is not None:  # a camera's EXIF orientation, applied to the small record (cheap)
            img = img.transpose(turn)
        pixels, _ = to_8bit(img, sixteen_bit)
    kept = content_box(width, height, max_aspect)
    aspect = (kept[2] - kept[0]) / (kept[3] - kept[1])
    if orientation in (5, 6, 7, 8):  # turned a quarter: the picture as shown is H×W
        width, height, aspect = height, width, 1 / aspect
    return Decoded(np.require(pixels, requirements=["C", "W"]), width, height, float(aspect))
