"""COCO-style annotations: a JSON file of ``images``, ``annotations`` and ``categories``, or a folder of them.

Sources (:func:`coco_files`):

- one JSON file → a deterministic 80/20 train/test split of its images (sorted by ``file_name``, then a seeded
  permutation: the split does not depend on the JSON's order);
- a folder holding ``train.json`` and ``test.json`` (or ``val.json``), or COCO's own layout
  ``annotations/instances_train*.json`` + ``annotations/instances_val*.json`` → those splits.

Each file: ``images`` (``id``, ``file_name``, ``width``, ``height``), ``annotations`` (``image_id``,
``category_id``, ``bbox`` [x, y, w, h] in pixels, ``segmentation`` as polygons or RLE — compressed or not —,
``iscrowd``, ``area``), ``categories`` (``id``, ``name``). Category ids become class ids 1..K in sorted id order
(the union of the files' categories; class 0 is ``background``). Masks come from pycocotools (``annToMask``'s
logic): crowd regions are painted 255 (ignored) first, then objects in decreasing area, so smaller objects lie on
top. Crowd boxes are kept with ``box_crowd`` set (never trained on, ignored in scoring).

Annotations without segmentation: when *no* annotation of the source has one, the sets hold boxes only
(``masks=None``); when some have, an annotation without one paints its box 255 (its pixels are neither
background nor known object), under the segmented objects — so every image still gets a mask.

Images: ``image_root`` (``--data-root``) when given, else the first of the JSON's folder, ``images/`` beside it,
and the folder named like its split (``instances_val2017.json`` → ``val2017/`` beside it or one level up) that
holds the images, through the image-folder cache. Images the JSON names that are in none of them stop the load
with their count, the first few names and the folders tried; an image the cache could not decode is left out,
with its reason in ``sources["skipped"]``; an image without annotations is kept (no boxes, all background).
"""
from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from selfsup.data.dense import IGNORE, DenseSet
from selfsup.data.dense_cache import DenseSource, Entry, Plan, Read, load_source
from selfsup.data.imageset import DataError

READER_VERSION = 1
SPLIT_SEED = 0
TEST_FRACTION = 0.2
PEEK_BYTES = 1 << 20
"""Bytes of a JSON file read to recognise it (and to find a few image names) without parsing all of it."""
SAMPLE_NAMES = 20
_KEY = re.compile(rb'"(images|annotations|categories)"\s*:\s*\[')
_FILE_NAME = re.compile(rb'"file_name"\s*:\s*"((?:[^"\\]|\\.)*)"')


# -------------------------------------------------------------------------------------------- recognising


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(PEEK_BYTES)


def is_coco_json(path: Path) -> bool:
    """A ``.json`` file whose first megabyte is a JSON object with an ``images`` or ``annotations`` list (cheap: a
    500 MB file is parsed once, by the loader). An empty file, or a small one that starts as an object but is not
    valid JSON, counts too, so that it gets the loader's error saying what is wrong with it."""
    try:
        if not (path.is_file() and path.suffix.lower() == ".json"):
            return False
        head = _head(path)
    except OSError:
        return False
    body = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not body:
        return True
    if not body.startswith(b"{"):
        return False
    if any(m.group(1) in (b"images", b"annotations") for m in _KEY.finditer(head)):
        return True
    if len(head) < PEEK_BYTES:  # the whole file: broken JSON is taken for a damaged COCO file
        try:
            json.loads(head)
        except ValueError:
            return True
    return False


def coco_files(path: Path) -> tuple[Path, Path] | None:
    """(train JSON, test JSON) of a folder source, or None when ``path`` is not such a folder."""
    if not path.is_dir():
        return None
    test = next((path / n for n in ("test.json", "val.json") if (path / n).is_file()), None)
    if (path / "train.json").is_file() and test is not None:
        return path / "train.json", test
    ann = path / "annotations"
    if ann.is_dir():
        train = sorted(ann.glob("instances_train*.json"))
        val = sorted(ann.glob("instances_val*.json"))
        if train and val:
            return train[0], val[0]
    return None


def is_coco_source(path: str | Path) -> bool:
    """A COCO JSON file, or a folder holding the train and test JSON files (module docstring)."""
    p = Path(path).expanduser()
    return is_coco_json(p) if p.is_file() else coco_files(p) is not None


# ---------------------------------------------------------------------------------------------- loading


def load_coco(path: str | Path, image_root: str | None = None, image_size: int = 64, *, cache_dir: str | None = None,
              cache_size: int | None = None, check: str = "fast", progress: bool = True) -> tuple[DenseSet, DenseSet]:
    """(train, test) dense sets of a COCO source (module docstring)."""
    p = Path(path).expanduser()
    if p.is_dir():
        pair = coco_files(p)
        if pair is None:
            raise DataError(f"{p}: no COCO annotation files (train.json and test.json or val.json, or "
                            "annotations/instances_train*.json and annotations/instances_val*.json)")
        files = [f.resolve() for f in pair]
    elif p.is_file():
        files = [p.resolve()]
    else:
        raise DataError(f"COCO annotations not found: {p}")
    parsed: dict[Path, dict] = {}
    found = [_image_root(f, image_root, parsed) for f in files]
    split_roots = (found[0][0], found[-1][0])
    tried = [t for _, t in found]
    name = f"coco:{p.name}"
    src = DenseSource(
        format="coco", name=name, sources=[str(f) for f in files], files=[str(f) for f in files], roots=split_roots,
        settings={"reader": READER_VERSION, "image_root": [str(r) for r in split_roots],
                  "split": "files" if len(files) == 2 else {"seed": SPLIT_SEED, "test": TEST_FRACTION}},
        plan=lambda listings: _plan(files, parsed, split_roots, tried, listings))
    return load_source(src, image_size, cache_dir=cache_dir, cache_size=cache_size, check=check, progress=progress)


def _parse(path: Path, parsed: dict[Path, dict]) -> dict:
    """The JSON file, parsed once per load, with the top-level checks every later step relies on."""
    if path in parsed:
        return parsed[path]
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    if not text.strip():
        raise DataError(f"{path} is empty: a COCO annotation file is a JSON object with images, annotations and "
                        "categories")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: a COCO file is a JSON object with images, annotations and categories, not a "
                        f"{type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: no {key!r} list; a COCO file has images, annotations and categories")
    if not data["images"]:
        raise DataError(f"{path}: its images list is empty")
    if not data["annotations"]:
        raise DataError(f"{path}: it has no annotations at all (no boxes, no segmentation)")
    if not data["categories"]:
        raise DataError(f"{path}: its categories list is empty")
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not all(k in im for k in ("id", "file_name", "width", "height")):
            raise DataError(f"{path}: images[{i}] lacks one of id, file_name, width, height: {str(im)[:120]}")
        if not (isinstance(im["width"], int) and isinstance(im["height"], int) and im["width"] > 0 and im["height"] > 0):
            raise DataError(f"{path}: image {im['file_name']} has width × height {im['width']} × {im['height']}; "
                            "both must be positive integers (pixels)")
    parsed[path] = data
    return data


def _clean(name: str) -> str:
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _peek_names(path: Path, parsed: dict[Path, dict]) -> list[str]:
    """A few ``file_name`` s: from the file's head when the images come first (a huge file is not parsed to find
    where its images lie), else from the parsed file."""
    try:
        found = [json.loads(b'"' + m.group(1) + b'"') for m in _FILE_NAME.finditer(_head(path))]
    except (OSError, ValueError):
        found = []
    if not found:
        found = [im["file_name"] for im in _parse(path, parsed)["images"]]
    return [_clean(n) for n in found[:SAMPLE_NAMES]]


def _candidates(path: Path, image_root: str | None) -> list[Path]:
    if image_root:
        return [Path(image_root).expanduser().resolve()]
    split = path.stem.rsplit("_", 1)[-1]  # instances_val2017 → val2017, train → train
    out = [path.parent, path.parent / "images", path.parent / split, path.parent.parent / split,
           path.parent / "images" / split]
    return list(dict.fromkeys(p.resolve() for p in out))


def _image_root(path: Path, image_root: str | None, parsed: dict[Path, dict]) -> tuple[Path, list[Path]]:
    """(the first candidate folder holding the images the file names, every folder tried). A sample of names
    decides; all of them are checked against the image cache when building."""
    names = _peek_names(path, parsed)
    tried = _candidates(path, image_root)
    for root in tried:
        if root.is_dir() and all((root / n).is_file() for n in names):
            return root, tried
    every = [_clean(im["file_name"]) for im in _parse(path, parsed)["images"]]  # an error: worth the whole parse
    have = {r: sum((r / n).is_file() for n in every) for r in tried if r.is_dir()}
    best = max(have, key=have.get, default=None)
    raise DataError(_missing_message(path, [n for n in every if best is None or not (best / n).is_file()],
                                     len(every), tried))


def _missing_message(path: Path, missing: list[str], total: int, tried: list[Path]) -> str:
    return (f"{path}: {len(missing)} of the {total} images it names are missing: {', '.join(missing[:5])}"
            f"{', …' if len(missing) > 5 else ''}; looked in {', '.join(str(t) for t in tried)}; pass the folder "
            "holding them as --data-root (data.root)")


# -------------------------------------------------------------------------------------------------- parsing


def _classes(files: list[Path], parsed: dict[Path, dict]) -> tuple[list[str], dict[int, int]]:
    """Class names (0 background, then categories in id order) and category id → class id, over every file."""
    names: dict[int, str] = {}
    for f in files:
        for c in _parse(f, parsed)["categories"]:
            if not isinstance(c, dict) or "id" not in c:
                raise DataError(f"{f}: a category without an id: {str(c)[:120]}")
            cid, cname = int(c["id"]), str(c.get("name", f"category_{c['id']}"))
            if names.setdefault(cid, cname) != cname:
                raise DataError(f"{f}: category {cid} is {cname!r} here but {names[cid]!r} in another file; the train "
                                "and test files must share one category list")
    ids = sorted(names)
    return ["background"] + [names[i] for i in ids], {cid: k + 1 for k, cid in enumerate(ids)}


def _polygons(seg: list) -> list[list[float]]:
    """The usable polygons of a segmentation list (at least three points; a shorter one pycocotools would read
    as a box)."""
    return [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]


def _has_segmentation(ann: dict) -> bool:
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        return "counts" in seg
    return isinstance(seg, list) and bool(_polygons(seg))


def _plan(files: list[Path], parsed: dict[Path, dict], roots: tuple[Path, Path], tried: list[list[Path]],
          listings: list[dict[str, int | str]]) -> Plan:
    classes, class_of = _classes(files, parsed)
    with_masks = any(_has_segmentation(a) for f in files for a in _parse(f, parsed)["annotations"])
    entries: list[Entry] = []
    for k, f in enumerate(files):
        data = _parse(f, parsed)
        images = {}
        for im in data["images"]:
            if im["id"] in images:
                raise DataError(f"{f}: image id {im['id']} appears twice ({images[im['id']]['file_name']}, "
                                f"{im['file_name']})")
            images[im["id"]] = im
        by_image: dict = defaultdict(list)
        for a in data["annotations"]:
            if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a:
                raise DataError(f"{f}: an annotation without image_id or category_id: {str(a)[:120]}")
            if a["image_id"] not in images:
                raise DataError(f"{f}: annotation {a.get('id', '?')} refers to image id {a['image_id']}, which its "
                                "images list does not have")
            if a["category_id"] not in class_of:
                raise DataError(f"{f}: annotation {a.get('id', '?')} has category_id {a['category_id']}, not one of "
                                f"the declared categories {sorted(class_of)[:20]}")
            by_image[a["image_id"]].append(a)
        ordered = sorted(images.values(), key=lambda im: _clean(im["file_name"]))
        if len(files) == 2:
            splits = [k] * len(ordered)
        else:
            perm = np.random.default_rng(SPLIT_SEED).permutation(len(ordered))
            test = set(perm[: int(round(TEST_FRACTION * len(ordered)))].tolist())
            splits = [int(i in test) for i in range(len(ordered))]
        listing = listings[splits[0]] if len(files) == 2 else listings[0]
        names = [_file_in(_clean(im["file_name"]), roots[s]) for im, s in zip(ordered, splits)]
        missing = [n for n in names if n not in listing]
        if missing:
            raise DataError(_missing_message(f, missing, len(names), tried[k]))
        seen: dict[str, int] = {}
        for im, s, n in zip(ordered, splits, names):
            if n in seen:
                raise DataError(f"{f}: images {seen[n]} and {im['id']} have the same file_name {n}")
            seen[n] = im["id"]
            anns = sorted(by_image.get(im["id"], []), key=_annotation_order)  # boxes in id order, whatever the JSON's
            entries.append(Entry(n, s, _reader(f, im, anns, class_of, with_masks)))
    if len(files) == 2 and roots[0] == roots[1]:
        shared = sorted({e.file for e in entries if e.split == 0} & {e.file for e in entries if e.split == 1})
        if shared:
            raise DataError(f"{files[0].name} and {files[1].name} both name {len(shared)} image(s) of {roots[0]}, "
                            f"e.g. {', '.join(shared[:3])}; a test image must not be trained on")
    info = {"split": "train/test files" if len(files) == 2 else
            f"{1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} of the images sorted by file name, seed {SPLIT_SEED}"}
    return Plan(entries, classes, with_masks, info=info)


def _annotation_order(ann: dict) -> tuple:
    i = ann.get("id")
    return (0, i, "") if isinstance(i, (int, float)) else (1, 0, str(i))


def _file_in(name: str, root: Path) -> str:
    """A ``file_name`` as a path relative to the image root (absolute names inside it are made relative)."""
    p = Path(name)
    if p.is_absolute():
        try:
            return p.resolve().relative_to(root).as_posix()
        except ValueError:
            return name
    return name


def _reader(path: Path, im: dict, anns: list[dict], class_of: dict[int, int], with_masks: bool):
    def read() -> Read:
        w, h = im["width"], im["height"]
        boxes, names = [], []
        for a in anns:
            label = f"annotation {a.get('id', '?')} of {path.name} (image {im['file_name']})"
            bbox = a.get("bbox")
            if bbox is None and _has_segmentation(a):
                bbox = _mask_utils().toBbox(_rle(a, h, w, label)).tolist()
            if not (isinstance(bbox, list) and len(bbox) == 4):
                raise DataError(f"{label}: bbox must be [x, y, width, height] in pixels, got {bbox!r}")
            x, y, bw, bh = (float(v) for v in bbox)
            boxes.append([x, y, x + bw, y + bh])
            names.append(f"{label}, bbox [x, y, w, h] = {[round(float(v), 2) for v in bbox]}")
        return Read((w, h), np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                    np.asarray([class_of[a["category_id"]] for a in anns], dtype=np.int64),
                    np.asarray([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool), names,
                    (lambda: _rasterise(path, im, anns, class_of)) if with_masks else None,
                    f"{path.name} image {im['file_name']}")
    return read


def _mask_utils():
    from pycocotools import mask as mask_utils

    return mask_utils


def _rle(ann: dict, h: int, w: int, label: str):
    """pycocotools RLE of an annotation's segmentation (``COCO.annToRLE``): polygons merged, uncompressed RLE
    compressed, compressed RLE as it is."""
    mu = _mask_utils()
    seg = ann["segmentation"]
    if isinstance(seg, list):
        return mu.merge(mu.frPyObjects(_polygons(seg), h, w))
    size = seg.get("size")
    if list(size or []) != [h, w]:
        raise DataError(f"{label}: its RLE segmentation has size {size}, but the image is {h} × {w} (height × width)")
    if isinstance(seg["counts"], list):
        return mu.frPyObjects(seg, h, w)
    counts = seg["counts"]
    return {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}


def _rasterise(path: Path, im: dict, anns: list[dict], class_of: dict[int, int]) -> np.ndarray:
    """uint8 (h, w) semantic mask: crowd and unsegmented boxes 255, then objects by decreasing area."""
    w, h = im["width"], im["height"]
    mask = np.zeros((h, w), dtype=np.uint8)
    objects = []
    for a in anns:
        label = f"annotation {a.get('id', '?')} of {path.name}"
        if not _has_segmentation(a):
            x, y, bw, bh = (float(v) for v in a["bbox"])
            x0, y0 = max(0, int(np.floor(x))), max(0, int(np.floor(y)))
            mask[y0 : int(np.ceil(y + bh)), x0 : int(np.ceil(x + bw))] = IGNORE
            continue
        with warnings.catch_warnings():  # pycocotools' Cython decode under NumPy 2: "__array__ … copy keyword"
            warnings.simplefilter("ignore", DeprecationWarning)
            m = _mask_utils().decode(_rle(a, h, w, label)).astype(bool)
        if a.get("iscrowd", 0):
            mask[m] = IGNORE
        else:
            objects.append((float(a.get("area") or m.sum()), class_of[a["category_id"]], m))
    for _, cls, m in sorted(objects, key=lambda o: -o[0]):
        mask[m] = cls
    return mask
