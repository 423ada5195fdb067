"""Small annotated folders written with PIL and json, as users bring them: images of mixed formats, sizes and
modes with flat coloured rectangles, and the same rectangles as VOC masks, instance masks, XML boxes or COCO
annotations, so a test can check that what was loaded lines up with the pixels."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

BACKGROUND = (128, 128, 128)
COLOURS = {1: (220, 40, 40), 2: (40, 180, 40), 3: (40, 40, 220)}
"""The colour each class is drawn in (RGB images)."""
GREYS = {1: 30, 2: 230}
"""The grey level each class is drawn in (grey images; classes 1 and 2 only)."""
Rect = tuple[int, tuple[int, int, int, int]]
"""(class id, (x0, y0, x1, y1)) in pixels, corners: x1 and y1 exclusive."""


@dataclass
class Drawn:
    stem: str
    file: str
    """Relative to the image folder."""
    size: tuple[int, int]
    rects: list[Rect] = field(default_factory=list)
    grey: bool = False


def voc_palette() -> list[int]:
    """Pascal VOC's colour map (bit-interleaved class ids), 256 × RGB flat."""
    out = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return out


def draw_image(path: Path, d: Drawn, mode: str = "RGB") -> None:
    """The image of ``d``: flat rectangles on a grey ground, saved in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("L" if d.grey else "RGB", d.size, BACKGROUND[0] if d.grey else BACKGROUND)
    pen = ImageDraw.Draw(img)
    for cls, (x0, y0, x1, y1) in d.rects:
        pen.rectangle([x0, y0, x1 - 1, y1 - 1], fill=GREYS[cls] if d.grey else COLOURS[cls])
    if mode != img.mode:
        img = img.convert(mode)
    if path.suffix == ".jpg":
        img.save(path, quality=95, subsampling=0)
    else:
        img.save(path)


def id_array(size: tuple[int, int], rects: list[Rect], border: bool = False, values: list[int] | None = None
             ) -> np.ndarray:
    """uint8 (H, W): each rectangle filled with its class id (or ``values[k]``), later ones on top; ``border``: a
    1 px ring of 255 around each (VOC's boundary pixels)."""
    a = np.zeros((size[1], size[0]), dtype=np.uint8)
    for k, (cls, (x0, y0, x1, y1)) in enumerate(rects):
        if border:
            a[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = 255
        a[y0:y1, x0:x1] = cls if values is None else values[k]
    return a


def save_palette(path: Path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(a, "P")
    img.putpalette(voc_palette())
    img.save(path)


def voc_xml(path: Path, d: Drawn, names: dict[int, str], difficult: set[int] = frozenset()) -> None:
    """VOC detection XML of ``d``'s rectangles (1-based inclusive pixel coordinates)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    objs = "".join(
        f"<object><name>{names[c]}</name><difficult>{int(k in difficult)}</difficult><bndbox><xmin>{x0 + 1}</xmin>"
        f"<ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for k, (c, (x0, y0, x1, y1)) in enumerate(d.rects))
    path.write_text(f"<annotation><filename>{d.file}</filename><size><width>{d.size[0]}</width><height>{d.size[1]}"
                    f"</height><depth>3</depth></size>{objs}</annotation>")


def corrupt_jpeg(path: Path, size=(40, 30)) -> None:
    """A JPEG cut in half: the image cache skips it as truncated."""
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


VOC_NAMES = {1: "aeroplane", 2: "bicycle", 3: "bird"}
VOC_IMAGES = [
    Drawn("a", "a.jpg", (64, 48), [(1, (8, 6, 30, 30)), (2, (36, 20, 60, 44))]),
    Drawn("b", "b.png", (50, 70), [(2, (5, 5, 45, 35)), (1, (10, 40, 30, 65))]),
    Drawn("c", "c.png", (40, 40), [(1, (4, 4, 20, 36))]),
    Drawn("d", "d.png", (60, 45), [(1, (5, 5, 25, 40)), (2, (30, 10, 55, 30))], grey=True),
    Drawn("e", "e.jpg", (48, 64), []),
    Drawn("g", "g.png", (56, 42), [(3, (10, 8, 40, 34))]),
    Drawn("h", "h.jpg", (45, 60), [(1, (10, 10, 40, 30))]),
]
"""a: JPEG, b: PNG, c: RGBA PNG, d: grey PNG, e: no objects, g: class 3 (test split only), h: a test JPEG."""
VOC_TRAIN, VOC_TEST = ["a", "b", "c", "d", "e", "f"], ["g", "h"]


def make_voc(root: Path, xml: bool = True, instances: bool = True, lists: bool = True) -> Path:
    """A Pascal VOC folder: JPEGImages of mixed formats, palette class masks (with 255 boundaries on ``a``),
    instance masks, XML boxes (``b``'s first object difficult), ImageSets lists; ``f`` is a corrupt JPEG with its
    annotations; ``zz.png`` a mask without an image; ``unlisted.jpg`` an image in no list."""
    for d in VOC_IMAGES:
        draw_image(root / "JPEGImages" / d.file, d, "RGBA" if d.stem == "c" else "L" if d.grey else "RGB")
        save_palette(root / "SegmentationClass" / f"{d.stem}.png", id_array(d.size, d.rects, border=d.stem == "a"))
        if instances:
            save_palette(root / "SegmentationObject" / f"{d.stem}.png",
                         id_array(d.size, d.rects, values=list(range(1, len(d.rects) + 1))))
        if xml:
            voc_xml(root / "Annotations" / f"{d.stem}.xml", d, VOC_NAMES, difficult={0} if d.stem == "b" else set())
    corrupt_jpeg(root / "JPEGImages" / "f.jpg")
    f = Drawn("f", "f.jpg", (40, 30), [(1, (5, 5, 20, 20))])
    save_palette(root / "SegmentationClass" / "f.png", id_array(f.size, f.rects))
    if xml:
        voc_xml(root / "Annotations" / "f.xml", f, VOC_NAMES)
    save_palette(root / "SegmentationClass" / "zz.png", id_array((20, 20), []))
    draw_image(root / "JPEGImages" / "unlisted.jpg", Drawn("unlisted", "unlisted.jpg", (30, 30)))
    if lists:
        sets = root / "ImageSets" / "Segmentation"
        sets.mkdir(parents=True)
        (sets / "train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
        (sets / "val.txt").write_text("\n".join(VOC_TEST) + "\n")
    return root


LABELMAP = {1: ("cat", (250, 50, 50)), 2: ("dog", (50, 250, 250))}


def make_rgb_generic(root: Path, n: int = 10, labelmap: bool = True) -> list[Drawn]:
    """``images/`` (one nested) + ``masks/`` RGB masks in CVAT labelmap colours; ``masks/orphan.png`` has no image
    and ``images/lonely.jpg`` no mask."""
    drawn = []
    for i in range(n):
        sub = "sub/" if i == n - 1 else ""
        w, h = 40 + 4 * i, 60 - 3 * i
        d = Drawn(f"{sub}x{i}", f"{sub}x{i}.{'png' if i % 2 else 'jpg'}", (w, h),
                  [(1 + i % 2, (4, 5, w // 2, h // 2)), (2 - i % 2, (w // 2 + 2, h // 2 + 1, w - 3, h - 4))])
        draw_image(root / "images" / d.file, d)
        a = id_array(d.size, d.rects)
        rgb = np.zeros((*a.shape, 3), dtype=np.uint8)
        for cls, (_, colour) in LABELMAP.items():
            rgb[a == cls] = colour
        (root / "masks" / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(root / "masks" / f"{d.stem}.png")
        drawn.append(d)
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(root / "masks" / "orphan.png")
    draw_image(root / "images" / "lonely.jpg", Drawn("lonely", "lonely.jpg", (20, 20)))
    if labelmap:
        (root / "labelmap.txt").write_text("# label:color_rgb:parts:actions\nbackground:0,0,0::\n" + "".join(
            f"{name}:{r},{g},{b}::\n" for name, (r, g, b) in LABELMAP.values()))
    return drawn


COCO_CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 12, "name": "kite"}]
COCO_CLASS = {3: 1, 7: 2, 12: 3}
"""Category id → the class id the loader gives it (sorted ids, 1..K)."""


def polygon(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def rle(size: tuple[int, int], box: tuple[int, int, int, int], compressed: bool = True) -> dict:
    from pycocotools import mask as mask_utils

    a = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = 1
    if not compressed:  # column-major run lengths, starting with a run of zeros
        flat = a.flatten(order="F")
        bounds = np.concatenate(([0], np.flatnonzero(np.diff(flat)) + 1, [len(flat)]))
        runs = ([0] if flat[0] else []) + np.diff(bounds).tolist()
        return {"size": [size[1], size[0]], "counts": runs}
    r = mask_utils.encode(np.asfortranarray(a))
    return {"size": r["size"], "counts": r["counts"].decode()}


def coco_annotation(ann_id: int, image_id: int, cat: int, box: tuple[int, int, int, int], seg=None, crowd: int = 0
                    ) -> dict:
    x0, y0, x1, y1 = box
    out = {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x0, y0, x1 - x0, y1 - y0],
           "area": float((x1 - x0) * (y1 - y0)), "iscrowd": crowd}
    if seg is not None:
        out["segmentation"] = seg
    return out


def coco_images_and_annotations() -> tuple[list[Drawn], list[dict], list[dict]]:
    """Six images (JPEG, PNG, RGBA, grey, none annotated) with polygon, compressed and uncompressed RLE and a
    crowd region; ``p1`` has a small dog over a large cat (listed first, so only area order puts it on top)."""
    drawn = [
        Drawn("p1", "p1.jpg", (64, 48), [(1, (4, 4, 50, 44)), (2, (20, 14, 36, 30))]),
        Drawn("p2", "p2.png", (50, 60), [(3, (6, 8, 40, 50))]),
        Drawn("p3", "p3.png", (40, 40), [(1, (5, 5, 22, 30))]),
        Drawn("p4", "p4.png", (44, 33), [(1, (4, 4, 30, 25))], grey=True),
        Drawn("p5", "p5.jpg", (30, 50), []),
        Drawn("p6", "p6.jpg", (60, 40), [(2, (30, 4, 56, 36))]),
    ]
    images = [{"id": 100 + k, "file_name": d.file, "width": d.size[0], "height": d.size[1]}
              for k, d in enumerate(drawn)]
    anns = [
        coco_annotation(2, 100, 7, (20, 14, 36, 30), polygon(20, 14, 36, 30)),
        coco_annotation(1, 100, 3, (4, 4, 50, 44), polygon(4, 4, 50, 44)),
        coco_annotation(3, 101, 12, (6, 8, 40, 50), rle((50, 60), (6, 8, 40, 50))),
        coco_annotation(4, 102, 3, (5, 5, 22, 30), rle((40, 40), (5, 5, 22, 30), compressed=False)),
        coco_annotation(5, 102, 7, (25, 25, 38, 38), rle((40, 40), (25, 25, 38, 38), compressed=False), crowd=1),
        coco_annotation(6, 103, 3, (4, 4, 30, 25), polygon(4, 4, 30, 25)),
        coco_annotation(7, 105, 7, (30, 4, 56, 36), polygon(30, 4, 56, 36)),
    ]
    return drawn, images, anns


def write_coco(path: Path, images: list[dict], anns: list[dict], categories=COCO_CATEGORIES) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns, "categories": categories}))
    return path


# ------------------------------------------------------------------------------------------------ checks


def nearest_class(record: torch.Tensor, grey: bool) -> torch.Tensor:
    """(S, S) class id whose drawing colour each image-record pixel is nearest to (0: the grey ground)."""
    x = record.float()
    if grey:
        levels = {0: BACKGROUND[0], **GREYS}
        x = x[:1]
    else:
        levels = {0: BACKGROUND, **COLOURS}
    ids = sorted(levels)
    ref = torch.tensor([levels[i] for i in ids], dtype=torch.float32).view(len(ids), -1, 1, 1)
    dist = (x[None] - ref).square().sum(1)
    return torch.tensor(ids)[dist.argmin(0)]


def dilate(m: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(m[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0


def assert_aligned(image_record: torch.Tensor, mask_record: torch.Tensor, grey: bool, classes: set[int]) -> None:
    """Each class's mask region and the image pixels drawn in its colour coincide within one pixel of the record."""
    seen = nearest_class(image_record, grey)
    mask = mask_record[0].long()
    for c in classes:
        in_mask, in_image = mask == c, seen == c
        assert in_mask.any() and in_image.any(), f"class {c} missing (mask {int(in_mask.sum())} px, image " \
                                                 f"{int(in_image.sum())} px)"
        assert not (in_mask & ~dilate(in_image)).any(), f"class {c}: mask pixels where the image is not that colour"
        assert not (in_image & ~dilate(in_mask | (mask == 255))).any(), f"class {c}: coloured pixels outside the mask"
