"""A folder of distinct real clip-art images with planted near-duplicates, and the pairs that are true.

Sources: PNGs of Debian's ``openclipart-png`` (``apt-get install -y openclipart-png``), drawn in a seeded
order and kept only when they are unlike every image kept before, so that the folder's own near-duplicates (the
library files one drawing under several names and in numbered variants) do not count against the method:

- byte-identical files and files sharing a name stem (``flask_matthew__01`` / ``__02``) are kept once;
- a 16×16 grey thumbnail (alpha composited on white, centred, unit norm) correlating > ``0.9`` with a kept one's, or
  with its mirror image's, rejects the image; so do blank images (thumbnail std < 4 grey levels) and images
  smaller than 32 px on a side.

Planted copies (what counts as a near-duplicate here): a copy resized to 60 %, a JPEG re-encoding at quality 60
(alpha composited on white first: JPEG has none), a 90 % centre crop, a mirror image (left-right), and the
combinations below. Each source gets one recipe, giving pairs and triples.
"""
from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

CLIPART_ROOTS = (Path("/usr/share/openclipart/png"), Path("/usr/share/openclipart"))


def on_white(img: Image.Image) -> Image.Image:
    """RGB with any transparency composited on white (how selfsup's decoder stores it)."""
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _crop(img: Image.Image, keep: float = 0.9) -> Image.Image:
    w, h = img.size
    dw, dh = round(w * (1 - keep) / 2), round(h * (1 - keep) / 2)
    return img.crop((dw, dh, w - dw, h - dh))


EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "resize60": lambda im: im.resize((max(1, round(im.width * 0.6)), max(1, round(im.height * 0.6))), Image.LANCZOS),
    "jpeg60": lambda im: im,  # written by plant() as the file's encoding: JPEG quality 60, on white
    "crop90": _crop,
    "mirror": ImageOps.mirror,
}
RECIPES: list[list[str]] = [["resize60"], ["jpeg60"], ["crop90"], ["mirror"], ["resize60", "jpeg60"],
                            ["crop90", "mirror"], ["crop90+jpeg60"], ["resize60+mirror", "jpeg60"]]
"""One per source, in turn: a list of copies, each a ``+``-joined chain of edits (a pair or a triple in all)."""


def clipart_files() -> list[Path]:
    for root in CLIPART_ROOTS:
        if root.is_dir():
            files = sorted(root.rglob("*.png"))
            if files:
                return files
    raise SystemExit("no clip art found: install it with `apt-get install -y openclipart-png`")


def _thumb(img: Image.Image, side: int = 16) -> np.ndarray:
    return np.asarray(on_white(img).convert("L").resize((side, side), Image.BILINEAR), dtype=np.float64).ravel()


@dataclass
class Planted:
    folder: Path
    distinct: list[Path]
    """Every distinct image copied in (sources included)."""
    groups: list[list[Path]]
    """Each planted group: its source first, then its copies."""
    recipes: list[list[str]]


def distinct_clipart(n: int, seed: int = 0) -> list[Path]:
    """``n`` clip-art files unlike each other (see the module docstring)."""
    files = clipart_files()
    order = np.random.default_rng(seed).permutation(len(files))
    kept: list[Path] = []
    patterns = np.zeros((0, 256))
    seen_bytes: set[str] = set()
    seen_stems: set[str] = set()
    for i in order:
        path = files[i]
        stem = re.sub(r"_+\d+$", "", path.stem)
        if stem in seen_stems:
            continue
        digest = hashlib.sha1(path.read_bytes()).hexdigest()
        if digest in seen_bytes:
            continue
        try:
            with Image.open(path) as im:
                im.load()
                if min(im.size) < 32:
                    continue
                t = _thumb(im)
                m = _thumb(ImageOps.mirror(im))
        except Exception:  # an unreadable file is not a source
            continue
        if t.std() < 4:
            continue
        v, mv = (t - t.mean()) / (np.linalg.norm(t - t.mean()) + 1e-9), (m - m.mean()) / (np.linalg.norm(m - m.mean()) + 1e-9)
        if len(patterns) and max((patterns @ v).max(), (patterns @ mv).max()) > 0.9:
            continue
        patterns = np.vstack([patterns, v])
        seen_bytes.add(digest)
        seen_stems.add(stem)
        kept.append(path)
        if len(kept) == n:
            return kept
    raise SystemExit(f"only {len(kept)} distinct clip-art images found, {n} asked for")


def plant(folder: Path, n_distinct: int, n_sources: int, seed: int = 0) -> Planted:
    """Copy ``n_distinct`` distinct images into ``folder`` and plant copies of ``n_sources`` of them."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    sources = distinct_clipart(n_distinct, seed)
    distinct = []
    for k, src in enumerate(sources):
        dst = folder / f"img{k:05d}_{src.name}"
        shutil.copyfile(src, dst)
        distinct.append(dst)
    rng = np.random.default_rng(seed + 1)
    chosen = rng.choice(len(distinct), n_sources, replace=False)
    groups, recipes = [], []
    for g, k in enumerate(chosen.tolist()):
        recipe = RECIPES[g % len(RECIPES)]
        with Image.open(distinct[k]) as im:
            im.load()
            base = im.copy()
        group = [distinct[k]]
        for c, chain in enumerate(recipe):
            img, edits = base, chain.split("+")
            for edit in edits:
                if edit != "jpeg60":  # the re-encoding is the last edit of a chain: the file is written at quality 60
                    img = EDITS[edit](img)
            jpeg = edits[-1] == "jpeg60"
            out = folder / f"dup{g:04d}_{c}_{chain.replace('+', '-')}.{'jpg' if jpeg else 'png'}"
            if jpeg:
                on_white(img).save(out, "JPEG", quality=60)
            else:
                img.save(out)
            group.append(out)
        groups.append(group)
        recipes.append(recipe)
    return Planted(folder, distinct, groups, recipes)
