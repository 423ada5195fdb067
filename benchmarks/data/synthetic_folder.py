"""Synthetic JPEG folders for scale benchmarks: crops of scikit-learn's two bundled sample photos.

Each image is a random crop (aspect 0.6–1.7, 120–400 px tall, at a random position) of one of the two
photos, resized so its longer side is 160–256 px, saved as a quality-90 JPEG in one of 10 class folders.
Image ``i`` depends only on ``(seed, i)``, so a folder can be made by several processes at once and the
first N images of a larger folder are the N-image folder (:func:`link_subset` hard-links them, costing no
disk space).

    python benchmarks/data/synthetic_folder.py DIR --images 200000 [--workers 2] [--subsets 10000,50000]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10
_photos: list[Image.Image] = []


def image_path(root: Path, i: int) -> Path:
    return root / f"class{i % CLASSES}" / f"{i:07d}.jpg"


def _make_range(root: str, start: int, stop: int, seed: int) -> int:
    global _photos
    if not _photos:
        from sklearn.datasets import load_sample_images

        _photos = [Image.fromarray(p) for p in load_sample_images().images]
    for i in range(start, stop):
        random_crop(_photos[i % 2], np.random.default_rng((seed, i))).save(image_path(Path(root), i), quality=90)
    return stop - start


def random_crop(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One synthetic image: a crop of aspect 0.6–1.7 and 120–400 px tall at a random position of ``photo``,
    resized so its longer side is 160–256 px."""
    aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))
    h = int(rng.integers(120, 400))
    w = min(photo.width, int(h * aspect))
    left, top = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
    longer = int(rng.integers(160, 257))
    scale = longer / max(w, h)
    return photo.crop((left, top, left + w, top + h)).resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)


def make_folder(root: Path, n: int, workers: int = 2, seed: int = 0, chunk: int = 2000) -> float:
    """``n`` JPEGs under ``root/class*/``; returns the seconds it took. Images already there are kept."""
    t0 = time.perf_counter()
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    todo = [(s, min(s + chunk, n)) for s in range(0, n, chunk) if not image_path(root, min(s + chunk, n) - 1).exists()]
    with ProcessPoolExecutor(workers) as pool:
        done = 0
        for k in pool.map(_make_range, *zip(*[(str(root), s, e, seed) for s, e in todo])) if todo else []:
            done += k
            print(f"\r{done}/{sum(e - s for s, e in todo)} images", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return time.perf_counter() - t0


def link_subset(source: Path, target: Path, n: int) -> None:
    """The first ``n`` images of ``source`` hard-linked into ``target`` (same class folders)."""
    for c in range(CLASSES):
        (target / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        dst = image_path(target, i)
        if not dst.exists():
            os.link(image_path(source, i), dst)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root")
    ap.add_argument("--images", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--subsets", default="", help="also link the first N images into ROOT_<N> (comma-separated)")
    args = ap.parse_args(argv)
    root = Path(args.root)
    seconds = make_folder(root, args.images, args.workers)
    print(f"{args.images} images in {root} ({seconds:.0f} s)")
    for n in (int(s) for s in args.subsets.split(",") if s):
        link_subset(root, Path(f"{root}_{n}"), n)
        print(f"first {n} linked into {root}_{n}")


if __name__ == "__main__":
    main()
