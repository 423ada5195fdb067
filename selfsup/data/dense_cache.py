"""Masks and boxes of annotated images, cached beside the image-folder cache their images come through.

A format reader (:mod:`selfsup.data.coco`, :mod:`selfsup.data.voc`) describes a :class:`DenseSource`: the
annotation files, one image folder per split, and a :meth:`DenseSource.plan` that parses the annotations into one
:class:`Entry` per image. :func:`load_source` then

1. loads each split's image folder through the image cache (:mod:`selfsup.data.cache`; decoded once) and maps the
   entries' image files onto its records by path;
2. reuses ``<image cache dir>.dense-<key>/`` when it matches — the key hashes the format, the annotation sources'
   absolute paths and the mask side S; its ``manifest.json`` records every annotation file's size and mtime_ns (a
   stat per file on every use: annotations are often fixed in place), each image cache's identity (path, record
   count and a digest of its stored paths, records and sizes) and the reader's settings — else builds it anew;
3. opens it: ``masks.u8`` holds uint8 (N, 1, S, S) class-id records read through a
   :class:`~selfsup.data.shard.RecordFile` (file-backed like the image records, so folders beyond RAM work),
   ``dense.npz`` the boxes, labels, crowd flags, per-image box offsets, sizes, image records and splits.

Geometry: annotations are taken in the upright picture's pixels (as the image cache stores it, EXIF orientation
applied — detectron2's convention); an annotation whose frame is the image's *stored* (unrotated) size of a photo
turned a quarter by EXIF is turned the same way. Masks are rasterised at that size, then cropped and squashed to
S×S exactly as the image record is (:func:`~selfsup.data.decode.content_box`, the centre 3:1 of a longer strip),
with NEAREST. Boxes are stored as fractions of the same content; ``sizes`` is its size in pixels (the original
image's unless it was longer than 3:1). A box reaching outside its image by at most :data:`BOX_TOLERANCE` px is
clipped; further, or with no area, is an error naming it.

Building writes into ``.tmp-<dense dir>-<pid>-<random>`` and renames it into place when complete (a kill or an
error leaves the previous cache untouched and no half cache that is used), under the image cache's lock helper.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from selfsup.data.build import publish_staged, remove_leftovers, staged_build
from selfsup.data.cache import CacheOptions, _build_lock, open_cache, prepare_folder
from selfsup.data.decode import _ORIENTATION, content_box
from selfsup.data.dense import IGNORE, DenseSet
from selfsup.data.imageset import DataError, ImageSet
from selfsup.data.manifest import Manifest
from selfsup.data.shard import RecordFile

DENSE_FORMAT = 1
MANIFEST = "manifest.json"
MASKS = "masks.u8"
ARRAYS = "dense.npz"
BOX_TOLERANCE = 1.0
"""Pixels a box may reach outside its image and still be clipped (rounding in annotation tools) rather than refused."""
SPLITS = ("train", "test")
_QUARTER_TURNS = (5, 6, 7, 8)


class SkipImage(Exception):
    """Raised by a reader for an image whose annotation file cannot be used (an unreadable mask PNG): the image is
    left out, ``str(exc)`` recorded as the reason in ``sources["skipped"]``."""


@dataclass
class Read:
    """One image's annotations as the source gives them, in the pixels of the frame they were made on."""
    size: tuple[int, int] | None
    """(width, height) of that frame; ``None``: the image's own (boxes only, no size given)."""
    boxes: np.ndarray
    """float64 (k, 4) (x0, y0, x1, y1) in pixels (corners: a box over pixel 0 alone is (0, 0, 1, 1))."""
    labels: np.ndarray
    """int64 (k,) class ids 1 … K."""
    crowd: np.ndarray
    """bool (k,): boxes never trained on and ignored in scoring (COCO ``iscrowd``, VOC ``difficult``)."""
    box_names: list[str]
    """How an error names each box (``"annotation 17 of x.json"``, ``"a.xml object 2"``)."""
    mask: Callable[[], np.ndarray] | None = None
    """uint8 (height, width) class ids at ``size``, made on demand (after the size check); ``None``: no mask."""
    name: str = ""
    """How an error names the annotation of this image (its mask or annotation file)."""
    frames: list[tuple[str, tuple[int, int]]] = field(default_factory=list)
    """Other files' (name, (width, height)) that must match the image too (a VOC XML's stated size beside its
    mask)."""


@dataclass
class Entry:
    file: str
    """The image file, relative to its split's image folder (POSIX separators, as the image cache lists it)."""
    split: int
    """0 train, 1 test."""
    read: Callable[[], Read]


@dataclass
class Plan:
    """What a reader's parse yields: the images to annotate and how their classes are named."""
    entries: list[Entry]
    classes: list[str] | Callable[[set[int]], list[str]]
    """Class names by id (0 background), or a function naming them from the ids the masks hold."""
    masks: bool
    """Whether the images get masks (a COCO file with only boxes gets none)."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Files left out before building (mask without an image, image without a mask, …) → reason."""
    info: dict = field(default_factory=dict)
    """What else the results should record (split rule, counts)."""
    classes_from: str = ""
    """Where declared class names came from (``labelmap.txt``), for errors."""


@dataclass
class DenseSource:
    format: str
    """``"coco"`` or ``"voc"``."""
    name: str
    sources: list[str]
    """Absolute paths the annotations were read from (a JSON file, a folder): part of the cache key."""
    files: list[str]
    """Every annotation file whose size and mtime decide reuse (also those whose absence matters)."""
    roots: tuple[Path, Path]
    """The image folder of the train and of the test split (often the same)."""
    settings: dict
    """What the records depend on besides the files (split rule, image root choice, reader version)."""
    plan: Callable[[list[dict[str, int | str]]], Plan]
    """Parse the annotations (only when building). Gets, per split, the image cache's files: relative path →
    record index (int) or skip reason (str), to match names and to drop what it cannot use."""


# ---------------------------------------------------------------------------------------------- loading


def load_source(src: DenseSource, image_size: int, *, cache_dir: str | None = None, cache_size: int | None = None,
                check: str = "fast", progress: bool = True) -> tuple[DenseSet, DenseSet]:
    """(train, test) dense sets of ``src``: the images through the image cache, masks and boxes through the dense
    cache beside it (built or rebuilt when missing or out of date)."""
    opts = CacheOptions(image_size, cache_size, cache_dir, check, None, progress)
    try:
        return _load(src, opts)
    except FileNotFoundError:  # a concurrent rebuild replaced a cache between its check and its opening
        return _load(src, opts)


def _load(src: DenseSource, opts: CacheOptions) -> tuple[DenseSet, DenseSet]:
    reports, images = {}, {}
    for root in dict.fromkeys(src.roots):
        reports[root] = prepare_folder(root, opts)
        images[root] = open_cache(reports[root], root, opts.image_size)
    manifests = [reports[r].manifest for r in src.roots]
    identity = [_image_identity(reports[r].path, m) for r, m in zip(src.roots, manifests)]
    target = dense_path(reports[src.roots[0]].path, src, opts.size)
    settings = {**src.settings, "format": src.format, "sources": src.sources, "size": opts.size}
    state = _validate(target, settings, _stat_all(src.files), identity)
    action = "reused"
    if state is not None:
        with _build_lock(target) as locked:
            stats = _stat_all(src.files)  # before parsing: a file edited during the build is seen as changed next time
            state = _validate(target, settings, stats, identity)
            if state is not None:
                if locked:
                    remove_leftovers(target.parent, target.name)
                plan = src.plan([_cache_files(m) for m in manifests])
                _build(target, src, plan, manifests, settings, opts, identity, stats)
                action = "built" if state == "missing" else f"rebuilt ({state})"
    return _open(target, src, [images[r] for r in src.roots], action)


def dense_path(image_cache: Path, src: DenseSource, size: int) -> Path:
    """``<image cache dir>.dense-<16 hex>``: the key hashes the format, the annotation sources and the side S."""
    key = hashlib.sha256(json.dumps({"format": src.format, "sources": src.sources, "size": size, "version": DENSE_FORMAT},
                                    sort_keys=True).encode()).hexdigest()[:16]
    return image_cache.parent / f"{image_cache.name}.dense-{key}"


def _cache_files(m: Manifest) -> dict[str, int | str]:
    f = m.files
    return {p: (k if k >= 0 else (s or "unreadable")) for p, k, s in zip(f["path"], f["index"], f["skip"])}


def _image_identity(path: Path, m: Manifest) -> dict:
    """What the dense records depend on in an image cache: which file is which record, and its size."""
    f = m.files
    digest = hashlib.sha256(json.dumps([f["path"], f["index"], f["width"], f["height"], f["skip"]]).encode())
    return {"path": str(path), "count": m.count, "digest": digest.hexdigest()[:32]}


def _stat_all(files: list[str]) -> dict[str, list[int] | None]:
    out: dict[str, list[int] | None] = {}
    for p in files:
        try:
            st = os.stat(p)
            out[p] = [st.st_size, st.st_mtime_ns]
        except OSError:
            out[p] = None
    return out


def _validate(target: Path, settings: dict, stats: dict, identity: list[dict]) -> str | None:
    """None when ``target`` is a usable dense cache for these inputs, else ``"missing"`` or why not."""
    try:
        m = json.loads((target / MANIFEST).read_text())
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest: {exc}"
    if not isinstance(m, dict) or m.get("format") != DENSE_FORMAT:
        return "another cache format"
    if m.get("settings") != json.loads(json.dumps(settings)):
        return "other settings"
    if m.get("images") != identity:
        return "the image cache changed"
    if m.get("files") != stats:
        changed = sum(1 for p, s in stats.items() if m["files"].get(p) != s) + len(m["files"].keys() - stats.keys())
        return f"{changed} annotation file(s) changed"
    want = int(m["count"]) * int(m["size"]) ** 2 if m.get("has_masks") else None
    try:
        if want is not None and os.stat(target / MASKS).st_size != want:
            return f"{MASKS} truncated or damaged"
        if not (target / ARRAYS).is_file():
            return f"{ARRAYS} missing"
    except OSError as exc:
        return f"damaged: {exc}"
    return None


def _open(target: Path, src: DenseSource, images: list[ImageSet], action: str) -> tuple[DenseSet, DenseSet]:
    m = json.loads((target / MANIFEST).read_text())
    with np.load(target / ARRAYS, allow_pickle=False) as z:
        arrays = {k: torch.from_numpy(z[k]) for k in z.files}
    n, size = int(m["count"]), int(m["size"])
    masks = None
    if m["has_masks"]:
        file = RecordFile(target / MASKS, n, (1, size, size))
        pixels = torch.from_numpy(np.memmap(target / MASKS, dtype=np.uint8, mode="c", shape=(n, 1, size, size)))
        masks = ImageSet(pixels, name=f"{src.name} masks", mapped=True, source=str(target), file=file)
    # a stand-in image set of n one-byte records lets DenseSet.subset cut boxes, masks and sizes per split
    full = DenseSet(ImageSet(torch.zeros(n, 1, 1, 1, dtype=torch.uint8)), list(m["classes"]), masks=masks,
                    boxes=arrays["boxes"], box_labels=arrays["labels"], box_crowd=arrays["crowd"],
                    box_start=arrays["start"], sizes=arrays["sizes"], name=src.name)
    sources = {"format": src.format, "files": src.sources, "image_roots": sorted({str(r) for r in src.roots}),
               "skipped": m["skipped"], "cache": {"path": str(target), "action": action, "built": m["build"]},
               **m["info"]}
    out = []
    for s, split in enumerate(SPLITS):
        idx = (arrays["split"] == s).nonzero().flatten()
        part = full.subset(idx)
        pics = images[s].subset(arrays["rows"][idx])
        pics.labels, pics.classes, pics.name = None, [], f"{src.name}/{split}"  # folder labels mean nothing here
        part.images, part.name, part.sources = pics, f"{src.name}/{split}", sources
        out.append(part)
    return out[0], out[1]


# --------------------------------------------------------------------------------------------- building


def _build(target: Path, src: DenseSource, plan: Plan, manifests: list[Manifest], settings: dict,
           opts: CacheOptions, identity: list[dict], stats: dict) -> None:
    t0 = time.perf_counter()
    size = opts.size
    if not plan.entries:
        raise DataError(f"{src.name}: no annotated images to use (skipped: {_first(plan.skipped)})")
    records = [{p: (k, w, h) for p, k, w, h in zip(m.files["path"], m.files["index"], m.files["width"],
                                                   m.files["height"]) if k >= 0} for m in manifests]
    skipped = dict(plan.skipped)
    unreadable = [_cache_files(m) for m in manifests]
    declared = plan.classes if isinstance(plan.classes, list) else None
    with staged_build(target, "annotation cache") as tmp:
        cols: dict[str, list] = {k: [] for k in ("boxes", "labels", "crowd", "count", "sizes", "rows", "split")}
        found: set[int] = set()
        entries = sorted(plan.entries, key=lambda e: (e.split, e.file))
        bar = tqdm(total=len(entries), desc=f"annotations {src.name} ({size}px)", unit="img",
                   disable=not opts.progress or len(entries) < 256)
        with open(tmp / MASKS, "wb") as f, bar:
            for e in entries:
                bar.update()
                got = records[e.split].get(e.file)
                if got is None:
                    why = unreadable[e.split].get(e.file, "not found in the image folder")
                    skipped[str(src.roots[e.split] / e.file)] = f"image unreadable: {why}"
                    continue
                row, width, height = got
                try:
                    read = e.read()
                except SkipImage as exc:
                    skipped[str(src.roots[e.split] / e.file)] = str(exc)
                    continue
                turn = _frame(read, e, src.roots[e.split], width, height)
                content = content_box(width, height)
                if plan.masks:
                    mask = _mask(read, turn, declared, plan.classes_from, found, width, height)
                    f.write(_squash(mask, content, size).tobytes())
                boxes, keep = _boxes(read, turn, width, height, content)
                cols["boxes"].append(boxes)
                cols["labels"].append(read.labels[keep])
                cols["crowd"].append(read.crowd[keep])
                cols["count"].append(len(boxes))
                cols["sizes"].append([round(content[2] - content[0]), round(content[3] - content[1])])
                cols["rows"].append(row)
                cols["split"].append(e.split)
            f.flush()
            os.fsync(f.fileno())
        n = len(cols["rows"])
        if n == 0:
            raise DataError(f"{src.name}: none of its {len(entries)} annotated images could be read; first: "
                            f"{_first(skipped)}")
        classes = declared if declared is not None else plan.classes(found)
        labels = np.concatenate(cols["labels"]).astype(np.int64)
        if len(labels) and (labels.min() < 1 or labels.max() >= len(classes)):
            raise DataError(f"{src.name}: box labels {sorted(set(labels.tolist()) - set(range(1, len(classes))))} "
                            f"are outside the classes 1..{len(classes) - 1}")
        start = np.zeros(n + 1, dtype=np.int64)
        start[1:] = np.cumsum(cols["count"])
        np.savez(tmp / ARRAYS, boxes=np.concatenate(cols["boxes"]).astype(np.float32).reshape(-1, 4), labels=labels,
                 crowd=np.concatenate(cols["crowd"]).astype(bool), start=start,
                 sizes=np.asarray(cols["sizes"], dtype=np.int64).reshape(-1, 2),
                 rows=np.asarray(cols["rows"], dtype=np.int64), split=np.asarray(cols["split"], dtype=np.int8))
        if not plan.masks:
            (tmp / MASKS).unlink()
        manifest = {"format": DENSE_FORMAT, "settings": settings, "files": stats, "images": identity,
                    "count": n, "size": size, "has_masks": plan.masks, "classes": list(classes),
                    "boxes": int(start[-1]), "skipped": skipped, "info": plan.info,}
        publish_staged(tmp, target, manifest, t0)


def _first(skipped: dict[str, str]) -> str:
    return next((f"{k}: {v}" for k, v in skipped.items()), "none")


def _frame(read: Read, e: Entry, root: Path, width: int, height: int) -> Image.Transpose | None:
    """The EXIF turn to apply to the annotation (None: it is in the upright picture's pixels); an error when its
    frame is neither the image's size nor, for a photo turned a quarter by EXIF, its stored size."""
    turns = set()
    for name, size in ([(read.name, read.size)] if read.size is not None else []) + read.frames:
        if tuple(size) == (width, height):
            turns.add(None)
            continue
        if tuple(size) == (height, width):
            turn = _quarter_turn(root / e.file)
            if turn is not None:
                turns.add(turn)
                continue
        raise DataError(f"{name}: its annotation is {size[0]}×{size[1]} px but its image {root / e.file} is "
                        f"{width}×{height} px (upright); masks and boxes must be made on the image itself")
    if len(turns) > 1:
        raise DataError(f"{read.name}: its annotation files disagree on the size of {root / e.file}: "
                        f"{[s for _, s in [(read.name, read.size)] + read.frames]}")
    return next(iter(turns), None)


def _quarter_turn(path: Path) -> Image.Transpose | None:
    try:
        with Image.open(path) as img:
            orientation = img.getexif().get(0x0112, 1)
    except Exception:
        return None
    return _ORIENTATION[orientation] if orientation in _QUARTER_TURNS else None


def _mask(read: Read, turn: Image.Transpose | None, declared: list[str] | None, classes_from: str, found: set[int],
          width: int, height: int) -> np.ndarray:
    """The image's class-id mask in the upright frame, its ids checked against the declared classes."""
    mask = read.mask() if read.mask is not None else None
    if mask is None:  # an image without annotations is all background
        return np.zeros((height, width), dtype=np.uint8)
    want = (read.size[1], read.size[0]) if read.size is not None else (height, width)
    if mask.shape != want:
        raise DataError(f"{read.name}: its mask is {mask.shape[1]}×{mask.shape[0]} px, its frame {want[1]}×{want[0]}")
    ids = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    ids = set(ids[ids != IGNORE].tolist())
    if declared is not None and ids - set(range(len(declared))):
        bad = sorted(ids - set(range(len(declared))))
        where = f" from {classes_from}" if classes_from else ""
        raise DataError(f"{read.name}: holds class ids {bad[:10]} but the classes{where} are 0..{len(declared) - 1} "
                        f"({', '.join(declared[:4])}{', …' if len(declared) > 4 else ''}); 255 marks pixels to ignore")
    found |= ids
    return mask if turn is None else np.asarray(Image.fromarray(mask).transpose(turn))


def squash(mask: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W) → (1, S, S): cropped and squashed as :func:`selfsup.data.decode.decode_image` does the image,
    with NEAREST (class ids are never blended)."""
    return _squash(mask, content_box(mask.shape[1], mask.shape[0]), size)


def _squash(mask: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    small = Image.fromarray(np.ascontiguousarray(mask)).resize((size, size), Image.NEAREST, box=box)
    return np.asarray(small, dtype=np.uint8)[None]


def _turn_points(x: np.ndarray, y: np.ndarray, w: float, h: float, turn: Image.Transpose) -> tuple:
    """Corner coordinates in a w×h frame → the same points after PIL's ``transpose(turn)``."""
    T = Image.Transpose
    return {T.FLIP_LEFT_RIGHT: (w - x, y), T.FLIP_TOP_BOTTOM: (x, h - y), T.ROTATE_180: (w - x, h - y),
            T.ROTATE_90: (y, w - x), T.ROTATE_270: (h - y, x), T.TRANSPOSE: (y, x),
            T.TRANSVERSE: (h - y, w - x)}[turn]


def _boxes(read: Read, turn: Image.Transpose | None, width: int, height: int,
           content: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(boxes (k', 4) fractions of the stored content, which of the k read boxes they are): boxes in the upright
    frame, checked (no area, or outside beyond the tolerance: an error naming the box), clipped to the image, then
    to the stored content (a box wholly outside a longer-than-3:1 image's centre is dropped)."""
    b = np.asarray(read.boxes, dtype=np.float64).reshape(-1, 4)
    if turn is not None and len(b):
        fw, fh = read.size
        xs, ys = _turn_points(b[:, [0, 2]], b[:, [1, 3]], fw, fh, turn)
        b = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)
    for i, (x0, y0, x1, y1) in enumerate(b.tolist()):
        if not (x1 > x0 and y1 > y0):
            raise DataError(f"{read.box_names[i]}: box (x0, y0, x1, y1) = ({x0:g}, {y0:g}, {x1:g}, {y1:g}) px has no "
                            "area (zero or negative width or height); fix or remove it")
        t = BOX_TOLERANCE
        if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t:
            raise DataError(f"{read.box_names[i]}: box (x0, y0, x1, y1) = ({x0:g}, {y0:g}, {x1:g}, {y1:g}) px reaches "
                            f"outside its {width}×{height} image by more than {t:g} px")
    b = np.clip(b, 0, [width, height, width, height])
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    for i in np.flatnonzero(area <= 0).tolist():
        raise DataError(f"{read.box_names[i]}: box {read.boxes[i].tolist()} px has no area inside its "
                        f"{width}×{height} image")
    cx0, cy0, cx1, cy1 = content
    frac = (b - [cx0, cy0, cx0, cy0]) / [cx1 - cx0, cy1 - cy0, cx1 - cx0, cy1 - cy0]
    frac = np.clip(frac, 0.0, 1.0)
    keep = np.flatnonzero((frac[:, 2] > frac[:, 0]) & (frac[:, 3] > frac[:, 1]))
    return frac[keep], keep
