"""VOC-style folders: images beside PNG class masks, optional instance masks and detection XML.

Layouts (:func:`voc_layout`):

- Pascal VOC: ``JPEGImages/`` with ``SegmentationClass/`` (class masks) and/or ``Annotations/*.xml`` (boxes);
  optional ``SegmentationObject/`` (instance masks);
- generic: ``images/`` + ``masks/`` (nested folders allowed: ``images/a/b.jpg`` ↔ ``masks/a/b.png``); optional
  ``SegmentationObject/`` and ``Annotations/`` beside them.

A mask is the PNG with the image's stem. Encodings: palette (mode P: the indices are class ids, as VOC saves
them), grey levels (L, 16-bit or bilevel: the values are class ids), RGB(A) with a ``labelmap.txt`` (CVAT's VOC
export: ``name:r,g,b::`` lines, line i = class i) mapping colours to classes (VOC's boundary colour 224,224,192 is
ignore unless listed). 255 is ignore. An RGB mask without a labelmap is an error.

Class names: ``labelmap.txt``; else ``classes.txt`` (one name per line, line i = id i); else VOC's 21 names when
the folder has VOC's layout and its mask ids are ≤ 20 (or its XML names are VOC's); else ``class_<i>`` for ids
0..max found (masks), or the XML names in sorted order (boxes only).

Boxes: from ``Annotations/*.xml`` (``object/name``, ``bndbox`` xmin ymin xmax ymax in 1-based pixels, ``difficult``
→ a crowd box: never trained on, ignored in scoring); else from ``SegmentationObject/`` (each instance id's
pixel box, its class the majority class-mask id under it, 0 and 255 not counted); else none (masks only).

Splits: ``ImageSets/Segmentation/train.txt`` + ``val.txt`` (or ``test.txt``), or ``ImageSets/Main/`` (the other way
round for a folder without masks); images not listed are not used. Without lists: a deterministic 80/20 split of
the usable stems in sorted order (seed 0). In a folder with masks an image without a mask, and a mask without an
image, are left out with a reason in ``sources["skipped"]``; a folder of XML boxes keeps images without an XML
(no boxes: detection datasets have such images).
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from selfsup.data.dense import IGNORE, DenseSet
from selfsup.data.dense_cache import DenseSource, Entry, Plan, Read, SkipImage, load_source
from selfsup.data.imageset import DataError

READER_VERSION = 1
SPLIT_SEED = 0
TEST_FRACTION = 0.2
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
VOC_BOUNDARY = (224, 224, 192)
"""The colour of VOC's 255 (boundary) pixels when its masks are drawn in RGB."""
SPLIT_NAMES = ("train.txt", "val.txt", "test.txt", "trainval.txt")
_SIXTEEN = ("I", "I;16", "I;16B", "I;16L", "I;16N")


@dataclass(frozen=True)
class Layout:
    root: Path
    images: Path
    masks: Path | None
    instances: Path | None
    xml: Path | None
    voc: bool
    """Pascal VOC's own layout (``JPEGImages/``): its 21 class names may apply."""


def voc_layout(path: str | Path) -> Layout | None:
    """The folder's layout (module docstring), or None when it is not a VOC-style folder."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    sub = lambda name: p / name if (p / name).is_dir() else None
    if sub("JPEGImages"):
        masks, xml = sub("SegmentationClass"), sub("Annotations")
        if masks is None and xml is None:
            return None
        return Layout(p.resolve(), (p / "JPEGImages").resolve(), masks and masks.resolve(),
                      sub("SegmentationObject") and sub("SegmentationObject").resolve(), xml and xml.resolve(), True)
    if sub("images") and sub("masks"):
        return Layout(p.resolve(), (p / "images").resolve(), (p / "masks").resolve(),
                      sub("SegmentationObject") and sub("SegmentationObject").resolve(),
                      sub("Annotations") and sub("Annotations").resolve(), False)
    return None


def is_voc_folder(path: str | Path) -> bool:
    return voc_layout(path) is not None


def _list(folder: Path | None, suffix: str) -> dict[str, str]:
    """Files ending in ``suffix`` under ``folder`` (hidden ones skipped): stem path (``a/b``) → relative path."""
    out: dict[str, str] = {}
    if folder is None:
        return out
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(folder)
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(suffix):
                r = (rel / name).as_posix()
                out.setdefault(r[: -len(suffix)], r)
    return out


def _stem(rel: str) -> str:
    return str(PurePosixPath(rel).with_suffix(""))


# ---------------------------------------------------------------------------------------------- loading


def load_voc_folder(path: str | Path, image_size: int = 64, *, cache_dir: str | None = None,
                    cache_size: int | None = None, check: str = "fast", progress: bool = True
                    ) -> tuple[DenseSet, DenseSet]:
    """(train, test) dense sets of a VOC-style folder (module docstring)."""
    layout = voc_layout(path)
    if layout is None:
        raise DataError(f"{path} is not a VOC-style folder: it needs JPEGImages/ with SegmentationClass/ or "
                        "Annotations/, or images/ with masks/")
    masks, instances, xmls = _list(layout.masks, ".png"), _list(layout.instances, ".png"), _list(layout.xml, ".xml")
    files = [str(layout.masks / r) for r in masks.values()] if layout.masks else []
    files += [str(layout.instances / r) for r in instances.values()] if layout.instances else []
    files += [str(layout.xml / r) for r in xmls.values()] if layout.xml else []
    files += [str(layout.root / n) for n in ("labelmap.txt", "classes.txt")]
    files += [str(layout.root / "ImageSets" / d / n) for d in ("Segmentation", "Main") for n in SPLIT_NAMES]
    src = DenseSource(format="voc", name=f"voc:{layout.root.name}", sources=[str(layout.root)], files=files,
                      roots=(layout.images, layout.images),
                      settings={"reader": READER_VERSION, "seed": SPLIT_SEED, "test": TEST_FRACTION},
                      plan=lambda listings: _plan(layout, masks, instances, xmls, listings[0]))
    return load_source(src, image_size, cache_dir=cache_dir, cache_size=cache_size, check=check, progress=progress)


def _split_lists(layout: Layout) -> tuple[list[str], list[str], str] | None:
    """(train stems, test stems, where from) of the ImageSets lists, or None where there are none."""
    subs = ("Segmentation", "Main") if layout.masks else ("Main", "Segmentation")
    for sub in subs:
        d = layout.root / "ImageSets" / sub
        test = next((d / n for n in ("val.txt", "test.txt") if (d / n).is_file()), None)
        if (d / "train.txt").is_file() and test is not None:
            read = lambda f: [line.split()[0] for line in f.read_text().splitlines()
                              if line.strip() and not line.lstrip().startswith("#")]
            return read(d / "train.txt"), read(test), f"ImageSets/{sub}/train.txt and {test.name}"
    return None


def _plan(layout: Layout, masks: dict[str, str], instances: dict[str, str], xmls: dict[str, str],
          listing: dict[str, int | str]) -> Plan:
    skipped: dict[str, str] = {}
    images: dict[str, str] = {}
    for rel in sorted(listing):
        first = images.setdefault(_stem(rel), rel)
        if first != rel:
            skipped[str(layout.images / rel)] = f"another image has the same name: {first}"
    mask_dir = layout.masks.name + "/" if layout.masks else ""
    for stem, rel in masks.items():
        if stem not in images:
            skipped[str(layout.masks / rel)] = f"a mask without an image (no {layout.images.name}/{stem}.*)"
    lists = _split_lists(layout)
    if lists is not None:
        train, test, where = lists
        both = sorted(set(train) & set(test))
        if both:
            raise DataError(f"{layout.root}: {len(both)} image(s) are listed in both splits of {where}, e.g. "
                            f"{', '.join(both[:3])}; a test image must not be trained on")
        chosen = [(s, 0) for s in dict.fromkeys(train)] + [(s, 1) for s in dict.fromkeys(test)]
        usable = []
        for stem, split in chosen:
            if stem not in images:
                skipped[f"{stem} ({where})"] = f"listed, but there is no image {layout.images.name}/{stem}.*"
            elif layout.masks and stem not in masks:
                skipped[str(layout.images / images[stem])] = f"no mask {mask_dir}{stem}.png"
            else:
                usable.append((stem, split))
        info = {"split": where, "unlisted images": len(set(images) - {s for s, _ in chosen})}
    else:
        stems = []
        for stem in sorted(images):
            if layout.masks and stem not in masks:
                skipped[str(layout.images / images[stem])] = f"no mask {mask_dir}{stem}.png"
            else:
                stems.append(stem)
        perm = np.random.default_rng(SPLIT_SEED).permutation(len(stems))
        test_set = set(perm[: int(round(TEST_FRACTION * len(stems)))].tolist())
        usable = [(s, int(i in test_set)) for i, s in enumerate(stems)]
        info = {"split": f"{1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} of the stems in sorted order, seed {SPLIT_SEED}"}
    if not usable:
        raise DataError(f"{layout.root}: no image has its annotation ({len(images)} images, {len(masks)} masks, "
                        f"{len(xmls)} XML files); first left out: {next(iter(skipped.items()), ('-', '-'))}")
    labelmap = _labelmap(layout.root / "labelmap.txt")
    declared, colours = (labelmap if labelmap else (_classes_txt(layout.root / "classes.txt"), None))
    classes_from = "labelmap.txt" if labelmap else "classes.txt" if declared else ""
    parsed = {stem: _parse_xml(layout.xml / xmls[stem]) for stem, _ in usable if stem in xmls}
    names = {o[0] for _, objects in parsed.values() for o in objects}
    if declared is None and names:
        if names <= set(VOC_CLASSES[1:]):
            declared, classes_from = list(VOC_CLASSES), "Pascal VOC's class names"
        elif layout.masks is None:
            declared, classes_from = ["background"] + sorted(names), "the XML object names"
        else:
            raise DataError(f"{layout.root}: the XML files name classes ({', '.join(sorted(names)[:5])}) but nothing "
                            "says which mask id each is; add classes.txt (line i = the name of class id i) or "
                            "labelmap.txt")
    class_id = {n: i for i, n in enumerate(declared)} if declared else {}
    unknown = sorted(names - set(class_id))
    if unknown:
        raise DataError(f"{layout.root / 'Annotations'}: object names {unknown[:5]} are not among the classes from "
                        f"{classes_from} ({', '.join(declared[:5])}, …)")
    entries = [Entry(images[stem], split, _reader(layout, stem, masks.get(stem), instances.get(stem), xmls.get(stem),
                                                  parsed.get(stem), colours, class_id))
               for stem, split in usable]
    classes = declared if declared else (lambda found: _name_classes(layout, found))
    return Plan(entries, classes, layout.masks is not None, skipped, info, classes_from)


def _name_classes(layout: Layout, found: set[int]) -> list[str]:
    top = max(found, default=0)
    if layout.voc and top < len(VOC_CLASSES):
        return list(VOC_CLASSES)
    return ["background"] + [f"class_{i}" for i in range(1, top + 1)]


# ------------------------------------------------------------------------------------------ class names


def _labelmap(path: Path) -> tuple[list[str], dict[int, int]] | None:
    """(names by id, packed RGB → id) of a CVAT ``labelmap.txt`` (``name:r,g,b:parts:actions`` per line)."""
    if not path.is_file():
        return None
    names, colours = [], {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(":")
        name, colour = parts[0].strip(), parts[1].strip() if len(parts) > 1 else ""
        if colour:
            try:
                rgb = [int(v) for v in colour.split(",")]
                if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                    raise ValueError
            except ValueError:
                raise DataError(f"{path} line {n}: colour {colour!r} is not r,g,b (0-255 each); lines are "
                                "name:r,g,b::") from None
            key = (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]
            if key in colours:
                raise DataError(f"{path} line {n}: colour {colour} is also class {names[colours[key]]!r}")
            colours[key] = len(names)
        names.append(name or f"class_{len(names)}")
    if not names:
        raise DataError(f"{path} lists no classes (lines name:r,g,b::, background first)")
    boundary = (VOC_BOUNDARY[0] << 16) | (VOC_BOUNDARY[1] << 8) | VOC_BOUNDARY[2]
    colours.setdefault(boundary, IGNORE)
    return names, colours


def _classes_txt(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    lines = [line.strip() for line in path.read_text().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise DataError(f"{path} is empty; it lists one class name per line, line i naming class id i (0 background)")
    return [name or f"class_{i}" for i, name in enumerate(lines)]


# ---------------------------------------------------------------------------------------------- reading


def _reader(layout: Layout, stem: str, mask: str | None, inst: str | None, xml: str | None, parsed: tuple | None,
            colours: dict[int, int] | None, class_id: dict[str, int]):
    def read() -> Read:
        m = _read_ids(layout.masks / mask, colours) if mask else None
        size = (m.shape[1], m.shape[0]) if m is not None else None
        boxes, labels, crowd, names, frames = [], [], [], [], []
        if parsed is not None:
            xml_path = layout.xml / xml
            xml_size, objects = parsed
            if size is None:
                size = xml_size
            elif xml_size is not None:
                frames.append((str(xml_path), xml_size))
            for k, (name, (x0, y0, x1, y1), difficult) in enumerate(objects):
                boxes.append([x0 - 1, y0 - 1, x1, y1])  # 1-based inclusive pixels → corners
                labels.append(class_id[name])
                crowd.append(difficult)
                names.append(f"{xml_path} object {k + 1} ({name}, xmin ymin xmax ymax = {x0:g} {y0:g} {x1:g} {y1:g})")
        elif inst is not None and m is not None:
            boxes, labels, names = _instance_boxes(layout.instances / inst, m)
            crowd = [False] * len(boxes)
        return Read(size, np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels, dtype=np.int64),
                    np.asarray(crowd, dtype=bool), names, (lambda: m) if m is not None else None,
                    str(layout.masks / mask) if mask else str(layout.xml / xml) if xml else stem, frames)
    return read


def _open_png(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return img
    except Exception as exc:  # PIL raises many types for broken files; each means "this mask cannot be used"
        raise SkipImage(f"unreadable mask {path}: {type(exc).__name__}: {exc}") from None


def _read_ids(path: Path, colours: dict[int, int] | None) -> np.ndarray:
    """uint8 (H, W) ids of a mask PNG in any of the encodings of the module docstring."""
    img = _open_png(path)
    mode = img.mode
    if mode in ("P", "L"):
        return np.asarray(img, dtype=np.uint8)
    if mode == "1":
        return np.asarray(img).astype(np.uint8)
    if mode == "LA":
        return np.asarray(img.getchannel("L"), dtype=np.uint8)
    if mode in _SIXTEEN:
        a = np.asarray(img)
        if a.max(initial=0) > 255:
            raise DataError(f"{path}: a 16-bit mask with values up to {int(a.max())}; class ids must be 0-254 "
                            "(255 = ignore)")
        return a.astype(np.uint8)
    if mode in ("RGB", "RGBA", "RGBX"):
        if colours is None:
            raise DataError(f"{path} is an RGB mask, but there is no labelmap.txt in the folder to say which colour "
                            "is which class (CVAT's VOC export writes one: name:r,g,b:: per line); add it, or save "
                            "masks as palette or grey PNGs whose values are class ids")
        return _colours_to_ids(np.asarray(img.convert("RGB")), colours, path)
    raise DataError(f"{path}: masks in PIL mode {mode} are not read; save palette (P), grey (L) or RGB PNGs")


def _colours_to_ids(rgb: np.ndarray, colours: dict[int, int], path: Path) -> np.ndarray:
    key = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    unique, inverse = np.unique(key.ravel(), return_inverse=True)
    lut = np.array([colours.get(int(k), -1) for k in unique], dtype=np.int64)
    if (lut < 0).any():
        bad = [f"({k >> 16},{(k >> 8) & 255},{k & 255})" for k in unique[lut < 0].tolist()]
        raise DataError(f"{path}: colours {', '.join(bad[:5])}{' …' if len(bad) > 5 else ''} are not in labelmap.txt "
                        "(class ids outside the declared classes)")
    return lut[inverse].reshape(key.shape).astype(np.uint8)


def _instance_boxes(path: Path, classes: np.ndarray) -> tuple[list, list, list]:
    """Boxes (corners, pixels), labels and names of each instance id of a SegmentationObject PNG: its class is the
    majority class-mask id under it (0 and 255 not counted); an instance over none of them gives no box."""
    inst = _read_ids(path, None)
    if inst.shape != classes.shape:
        raise DataError(f"{path} is {inst.shape[1]}×{inst.shape[0]} px but its class mask is "
                        f"{classes.shape[1]}×{classes.shape[0]} px")
    boxes, labels, names = [], [], []
    ids = np.flatnonzero(np.bincount(inst.ravel(), minlength=256))
    for i in ids[(ids != 0) & (ids != IGNORE)].tolist():
        ys, xs = np.nonzero(inst == i)
        votes = np.bincount(classes[ys, xs], minlength=256)
        votes[[0, IGNORE]] = 0
        if votes.sum() == 0:
            continue
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels.append(int(votes.argmax()))
        names.append(f"{path} instance {i}")
    return boxes, labels, names


def _parse_xml(path: Path) -> tuple[tuple[int, int] | None, list[tuple[str, tuple[float, ...], bool]]]:
    """(the (width, height) it states or None, and each object's (name, (xmin, ymin, xmax, ymax), difficult)) of a
    VOC detection XML file."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"{path} is not valid XML: {exc}") from None
    out = []
    for k, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        try:
            values = tuple(float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise DataError(f"{path} object {k + 1} ({name or 'no name'}): bndbox needs numeric xmin, ymin, xmax and "
                            "ymax") from None
        if not name:
            raise DataError(f"{path} object {k + 1}: no <name>")
        out.append((name, values, (obj.findtext("difficult") or "0").strip().lower() in ("1", "true")))
    try:  # a size of 0 × 0 or none at all (some exporters) states nothing
        size = root.find("size")
        w, h = int(float(size.findtext("width"))), int(float(size.findtext("height")))
    except (AttributeError, TypeError, ValueError):
        w = h = 0
    return ((w, h) if w > 0 and h > 0 else None), out
