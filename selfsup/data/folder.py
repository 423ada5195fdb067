"""Image folders: ``root/*.png`` (unlabelled) or ``root/<class>/**/*.png`` (class subfolders give labels).

Every file is decoded, converted to 8-bit grayscale or RGB (palette, 16-bit, CMYK, alpha and
bilevel images included), resized so its shorter side is ``image_size`` and centre-cropped.
Unreadable files — zero bytes, truncated, not an image, decompression bombs — are skipped and
counted; a folder where most files are unreadable stops with a summary instead of training on
the remainder.
"""
from __future__ import annotations

import logging
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from selfsup.data.imageset import DataError, ImageSet

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
MAX_BROKEN_FRACTION = 0.5
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is skipped, never half-decoded


def _to_8bit(img: Image.Image) -> tuple[np.ndarray, bool]:
    """(H, W, C) uint8 and whether the image is grayscale."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if mode.startswith("I;16") or a.max() > 255 else (0.0, 255.0)
        if mode == "F":
            lo, hi = float(a.min()), float(a.max()) if a.max() > a.min() else float(a.min()) + 1
        a = np.clip((a - lo) / (hi - lo) * 255.0, 0, 255).round().astype(np.uint8)
        return a[:, :, None], True
    if mode in ("1", "L"):
        return np.asarray(img.convert("L"))[:, :, None], True
    if mode == "LA" or mode == "PA" or mode == "RGBA" or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
        return np.asarray(rgb), mode == "LA"
    return np.asarray(img.convert("RGB")), False


def _resize_center(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC if img.mode not in ("1", "P") else Image.NEAREST)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def read_image(path: Path, size: int) -> tuple[np.ndarray, bool]:
    """One file as (size, size, C) uint8; raises ``OSError``/``ValueError`` for unreadable files."""
    if path.stat().st_size == 0:
        raise ValueError("zero bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            if img.mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            elif img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                arr, _ = _to_8bit(img)
                img = Image.fromarray(arr[:, :, 0], "L")
            img = _resize_center(img, size)
            return _to_8bit(img)


def list_images(root: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """Files, their labels (``None`` without class subfolders) and class names."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    top_level = [p for p in files if p.parent == root]
    classes = sorted({p.relative_to(root).parts[0] for p in files if p.parent != root})
    if classes and not top_level:
        index = {c: i for i, c in enumerate(classes)}
        return files, [index[p.relative_to(root).parts[0]] for p in files], classes
    return files, None, []


def load_image_folder(root: str | Path, image_size: int = 64, workers: int = 4) -> ImageSet:
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"image folder not found: {base}")
    files, labels, classes = list_images(base)
    if not files:
        raise DataError(f"{base} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}); point --data at a folder of images")

    def attempt(path: Path):
        try:
            return read_image(path, image_size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning,
                MemoryError) as exc:
            return f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(attempt, files))
    ok = [i for i, r in enumerate(results) if not isinstance(r, str)]
    broken = {str(files[i]): results[i] for i, r in enumerate(results) if isinstance(r, str)}
    if broken:
        reasons = Counter(r.split(":")[0] for r in broken.values())
        log.warning("skipped %d unreadable file(s) in %s (%s); first: %s", len(broken), base,
                    ", ".join(f"{k}×{v}" for k, v in reasons.items()), next(iter(broken.items())))
    if not ok or len(broken) > MAX_BROKEN_FRACTION * len(files):
        examples = "; ".join(f"{p}: {r}" for p, r in list(broken.items())[:3])
        raise DataError(f"{base}: {len(broken)} of {len(files)} image files are unreadable "
                        f"(more than {MAX_BROKEN_FRACTION:.0%}); examples: {examples}")
    gray = all(results[i][1] for i in ok)
    arrays = [results[i][0] for i in ok]
    if not gray:
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    y = None if labels is None else torch.tensor([labels[i] for i in ok], dtype=torch.long)
    return ImageSet(images, y, classes, f"folder:{base.name}", [str(files[i]) for i in ok], len(broken))
