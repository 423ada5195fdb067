"""Dense annotations users bring — COCO JSON, VOC folders, generic image/mask folders — read into DenseSets on
small real folders the tests write: masks line up with the pixels, boxes with the drawn rectangles, classes and
splits as documented, the cache beside the image cache is reused and rebuilt, and bad input says what is wrong."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.config import DataConfig
from selfsup.data import DataError
from selfsup.data import coco as coco_mod
from selfsup.data import dense_cache
from selfsup.data.annotations import is_dense_source, load_dense
from selfsup.data.coco import is_coco_source, load_coco
from selfsup.data.load import load_dataset
from selfsup.data.voc import VOC_CLASSES, is_voc_folder, load_voc_folder

from annotated_folders import (COCO_CATEGORIES, COCO_CLASS, LABELMAP, VOC_IMAGES, VOC_TEST, VOC_TRAIN, Drawn,
                               assert_aligned, coco_annotation, coco_images_and_annotations, draw_image, id_array,
                               make_rgb_generic, make_voc, save_palette, voc_xml, write_coco)

SIZE = 24
S = 32  # round(4/3 · 24): the stored side of image and mask records


def _cache(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


def _voc(root: Path, tmp_path: Path):
    return load_voc_folder(root, SIZE, cache_dir=_cache(tmp_path), progress=False)


def _coco(path: Path, tmp_path: Path, **kw):
    return load_coco(path, image_size=SIZE, cache_dir=_cache(tmp_path), progress=False, **kw)


def _stems(d) -> list[str]:
    return [Path(p).with_suffix("").name for p in d.images.paths]


def _fractions(d: Drawn) -> torch.Tensor:
    w, h = d.size
    return torch.tensor([[x0 / w, y0 / h, x1 / w, y1 / h] for _, (x0, y0, x1, y1) in d.rects]).reshape(-1, 4)


def _check_image(ds, i: int, d: Drawn, crowd: list[bool] | None = None) -> None:
    """Image i of ``ds`` is ``d``: its boxes are the drawn rectangles as fractions, its mask lines up with them."""
    boxes, labels, is_crowd = ds.boxes_of(i)
    assert torch.allclose(boxes, _fractions(d), atol=1e-6), (d.stem, boxes)
    assert labels.tolist() == [c for c, _ in d.rects]
    assert is_crowd.tolist() == (crowd or [False] * len(d.rects))
    assert ds.sizes[i].tolist() == list(d.size)
    if ds.masks is not None:
        mask = ds.masks.batch([i])[0]
        assert mask.shape == (1, S, S) and mask.dtype == torch.uint8
        if d.rects:
            assert_aligned(ds.images.batch([i])[0], mask, d.grey, {c for c, _ in d.rects})
        else:
            assert int(mask.max()) == 0, "an image without objects is all background"


# ------------------------------------------------------------------------------------------------ VOC


def test_voc_folder_palette_masks_xml_boxes_classes_and_splits(tmp_path):
    """JPEG, PNG, RGBA and grey images of different sizes; palette masks; XML boxes (a difficult one is a crowd
    box); ImageSets lists; a corrupt image, a mask without an image, an image in no list."""
    root = make_voc(tmp_path / "voc")
    train, test = _voc(root, tmp_path)
    assert train.classes == test.classes == list(VOC_CLASSES)
    assert _stems(train) == [s for s in VOC_TRAIN if s != "f"] and _stems(test) == VOC_TEST
    assert train.images.labels is None and train.masks.mapped and train.masks.stored_size == S
    by = {d.stem: d for d in VOC_IMAGES}
    for ds in (train, test):
        for i, stem in enumerate(_stems(ds)):
            _check_image(ds, i, by[stem], crowd=[True, False] if stem == "b" else None)
    a = train.masks.batch([0])[0]
    assert (a == 255).any(), "VOC's boundary pixels stay 255 (ignore)"
    assert not train.class_presence()[:, 3].any() and test.class_presence()[:, 3].any(), \
        "class 3 appears in the test split only, and is still a declared class"
    skipped = train.sources["skipped"]
    assert skipped[str(root / "JPEGImages" / "f.jpg")].lower().startswith("image unreadable: decode error: oserror: "
                                                                           "truncated")
    assert "without an image" in skipped[str(root / "SegmentationClass" / "zz.png")]
    assert train.sources["unlisted images"] == 1 and "ImageSets/Segmentation" in train.sources["split"]
    assert train.sources["cache"]["action"] == "built"


def test_voc_boxes_from_instance_masks_when_there_is_no_xml(tmp_path):
    root = make_voc(tmp_path / "voc", xml=False)
    train, test = _voc(root, tmp_path)
    by = {d.stem: d for d in VOC_IMAGES}
    for ds in (train, test):
        for i, stem in enumerate(_stems(ds)):
            _check_image(ds, i, by[stem])  # each instance's pixel box, its class the class mask's under it


def test_voc_without_lists_splits_80_20_by_sorted_stem(tmp_path):
    root = make_voc(tmp_path / "voc", lists=False)
    train, test = _voc(root, tmp_path)
    usable = sorted(["a", "b", "c", "d", "e", "f", "g", "h"])  # unlisted.jpg has no mask
    perm = np.random.default_rng(0).permutation(len(usable))
    want_test = sorted(usable[i] for i in perm[:2])
    assert _stems(test) == [s for s in want_test if s != "f"]
    assert sorted(_stems(train) + _stems(test) + ["f"]) == usable
    assert "no mask" in train.sources["skipped"][str(root / "JPEGImages" / "unlisted.jpg")]
    again, _ = load_voc_folder(root, SIZE, cache_dir=str(tmp_path / "other_cache"), progress=False)
    assert _stems(again) == _stems(train), "the split is deterministic"


def test_rgb_masks_with_a_cvat_labelmap(tmp_path):
    drawn = make_rgb_generic(tmp_path / "generic")
    assert is_voc_folder(tmp_path / "generic")
    train, test = _voc(tmp_path / "generic", tmp_path)
    assert train.classes == ["background"] + [name for name, _ in LABELMAP.values()]
    assert len(train) == 8 and len(test) == 2 and not train.has_boxes and train.has_masks
    by = {d.stem: d for d in drawn}
    for ds in (train, test):
        for i, p in enumerate(ds.images.paths):
            d = by[Path(p).relative_to(tmp_path / "generic" / "images").with_suffix("").as_posix()]
            mask = ds.masks.batch([i])[0]
            assert_aligned(ds.images.batch([i])[0], mask, False, {1, 2})
    skipped = train.sources["skipped"]
    assert "without an image" in skipped[str(tmp_path / "generic" / "masks" / "orphan.png")]
    assert "no mask" in skipped[str(tmp_path / "generic" / "images" / "lonely.jpg")]


def test_an_rgb_mask_without_a_labelmap_is_an_error(tmp_path):
    make_rgb_generic(tmp_path / "generic", labelmap=False)
    with pytest.raises(DataError, match=r"x\d\.png is an RGB mask.*no labelmap\.txt"):
        _voc(tmp_path / "generic", tmp_path)


def _grey_folder(root: Path, ids: list[int]) -> None:
    """Images with one red square, and grey masks giving it class ``ids[k]``."""
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for k, cls in enumerate(ids):
        d = Drawn(f"m{k}", f"m{k}.png", (30, 20), [(1, (3, 3, 15, 15))])
        draw_image(root / "images" / d.file, d)
        Image.fromarray(id_array(d.size, [(cls, (3, 3, 15, 15))]), "L").save(root / "masks" / f"m{k}.png")


def test_class_names_from_classes_txt_or_numbered_and_ids_outside_them(tmp_path):
    _grey_folder(tmp_path / "g", [1, 2, 1, 2, 1])
    train, _ = _voc(tmp_path / "g", tmp_path)
    assert train.classes == ["background", "class_1", "class_2"], "no names: class_<i> for the ids found"
    (tmp_path / "g" / "classes.txt").write_text("background\nleaf\nstem\n")
    train, _ = _voc(tmp_path / "g", tmp_path)
    assert train.classes == ["background", "leaf", "stem"] and train.sources["cache"]["action"].startswith("rebuilt")
    _grey_folder(tmp_path / "g", [1, 2, 1, 5, 1])
    with pytest.raises(DataError, match=r"m3\.png: holds class ids \[5\] but the classes from classes\.txt are 0\.\.2"):
        _voc(tmp_path / "g", tmp_path)


def test_a_quarter_turned_photo_and_a_strip_longer_than_3_to_1(tmp_path):
    """A JPEG with EXIF orientation 6 (the cache stores it upright) annotated on its stored pixels, another
    annotated upright, and a 90×20 strip (the record keeps its centre 60×20): masks and instance boxes follow."""
    root = tmp_path / "g"
    raw = Drawn("turned", "turned.jpg", (40, 30), [(1, (4, 3, 20, 12)), (2, (24, 14, 38, 28))])
    img = Image.new("RGB", raw.size, (128, 128, 128))
    for cls, (x0, y0, x1, y1) in raw.rects:
        img.paste((220, 40, 40) if cls == 1 else (40, 180, 40), (x0, y0, x1, y1))
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "images").mkdir(parents=True)
    img.save(root / "images" / "turned.jpg", quality=95, subsampling=0, exif=exif)
    img.save(root / "images" / "upright.jpg", quality=95, subsampling=0, exif=exif)
    strip = Drawn("strip", "strip.png", (90, 20), [(1, (40, 4, 60, 16)), (2, (2, 2, 10, 18))])
    draw_image(root / "images" / strip.file, strip)
    ids = id_array(raw.size, raw.rects)
    upright = np.ascontiguousarray(np.rot90(ids, -1))  # orientation 6: turned 90° clockwise to show upright
    for stem, a in (("turned", ids), ("upright", upright), ("strip", id_array(strip.size, strip.rects))):
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(a, "L").save(root / "masks" / f"{stem}.png")
        inst = (a > 0).astype(np.uint8) * (a == 1) + (a == 2) * 2
        save_palette(root / "SegmentationObject" / f"{stem}.png", inst.astype(np.uint8))
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("turned\nupright\nstrip\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("")
    train, _ = _voc(root, tmp_path)
    assert sorted(_stems(train)) == ["strip", "turned", "upright"]
    for i, stem in enumerate(_stems(train)):
        classes = {1} if stem == "strip" else {1, 2}  # the strip's class 2 lies outside the stored centre
        assert_aligned(train.images.batch([i])[0], train.masks.batch([i])[0], False, classes)
        boxes, labels, _ = train.boxes_of(i)
        if stem == "strip":
            assert train.sizes[i].tolist() == [60, 20]
            assert torch.allclose(boxes, torch.tensor([[25 / 60, 4 / 20, 45 / 60, 16 / 20], [0, 2 / 20, 0, 18 / 20]])
                                  [: len(boxes)], atol=1e-6) and labels.tolist() == [1]
        else:  # (4, 3, 20, 12) in a 40×30 frame turned clockwise: (30 - 12, 4, 30 - 3, 20) in 30×40
            assert train.sizes[i].tolist() == [30, 40]
            assert torch.allclose(boxes[0], torch.tensor([18 / 30, 4 / 40, 27 / 30, 20 / 40]), atol=1e-6)


@pytest.mark.parametrize("turn", list(Image.Transpose)[:7])
def test_turned_box_corners_match_pils_transpose(turn):
    a = np.zeros((5, 7), dtype=np.uint8)
    a[1:4, 2:6] = 1
    t = np.asarray(Image.fromarray(a).transpose(turn))
    ys, xs = np.nonzero(t)
    x, y = dense_cache._turn_points(np.array([2.0, 6.0]), np.array([1.0, 4.0]), 7, 5, turn)
    assert [x.min(), y.min(), x.max(), y.max()] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


# ----------------------------------------------------------------------------------------------- COCO


def _coco_folder(root: Path, images_dir: str = "images") -> tuple[list[Drawn], list[dict], list[dict]]:
    drawn, images, anns = coco_images_and_annotations()
    for d in drawn:
        draw_image(root / images_dir / d.file, d, "RGBA" if d.stem == "p3" else "L" if d.grey else "RGB")
    return drawn, images, anns


def test_coco_polygons_rle_crowd_category_ids_and_the_80_20_split(tmp_path):
    root = tmp_path / "coco"
    drawn, images, anns = _coco_folder(root)
    path = write_coco(root / "ann.json", images, anns)
    assert is_coco_source(path) and is_dense_source(str(path)) and not is_voc_folder(root)
    train, test = _coco(path, tmp_path)
    assert train.classes == ["background", "cat", "dog", "kite"], "category ids 3, 7, 12 → classes 1, 2, 3"
    assert train.sources["image_roots"] == [str((root / "images").resolve())], "images/ beside the JSON"
    assert len(train) == 5 and len(test) == 1
    by = {d.file: d for d in drawn}
    crowd_of = {"p3.png": [False, True]}
    for ds in (train, test):
        for i, p in enumerate(ds.images.paths):
            d = by[Path(p).name]
            mine = sorted((a for a in anns if a["image_id"] == images[drawn.index(d)]["id"]), key=lambda a: a["id"])
            w, h = d.size
            boxes, labels, crowd = ds.boxes_of(i)
            want = [[a["bbox"][0] / w, a["bbox"][1] / h, (a["bbox"][0] + a["bbox"][2]) / w,
                     (a["bbox"][1] + a["bbox"][3]) / h] for a in mine]
            assert torch.allclose(boxes, torch.tensor(want).reshape(-1, 4), atol=1e-6)
            assert labels.tolist() == [COCO_CLASS[a["category_id"]] for a in mine]
            assert crowd.tolist() == crowd_of.get(d.file, [False] * len(mine))
            mask = ds.masks.batch([i])[0]
            if d.rects:
                assert_aligned(ds.images.batch([i])[0], mask, d.grey, {c for c, _ in d.rects})
            else:
                assert int(mask.max()) == 0 and len(boxes) == 0, "an image without annotations: background, no boxes"
            if d.file == "p1.jpg":  # the small dog lies over the large cat although the JSON lists it first
                assert (mask == 2).sum() > 0 and (mask == 1).sum() > (mask == 2).sum()
            if d.file == "p3.png":  # the crowd region is ignored: 255 over its box (25..38 of 40 px)
                ys, xs = np.nonzero(mask[0].numpy() == 255)
                assert abs(xs.min() - 25 / 40 * S) <= 1 and abs(xs.max() + 1 - 38 / 40 * S) <= 1
    names = sorted(d.file for d in drawn)  # the documented rule: sorted by file name, then a seeded permutation
    assert [Path(p).name for p in test.images.paths] == [names[np.random.default_rng(0).permutation(6)[0]]]
    shuffled = write_coco(root / "again.json", images[::-1], anns[::-1])
    train2, test2 = _coco(shuffled, tmp_path)
    assert train2.images.paths == train.images.paths and test2.images.paths == test.images.paths, \
        "the split does not depend on the JSON's order"
    assert torch.equal(train2.boxes, train.boxes) and torch.equal(train2.masks.images, train.masks.images)


def test_coco_folder_with_train_and_test_files_and_a_class_only_in_test(tmp_path):
    root = tmp_path / "coco"
    drawn, images, anns = _coco_folder(root)
    test_ids = {101, 105}  # p2 (the only kite) and p6
    pick = lambda ids: ([im for im in images if im["id"] in ids], [a for a in anns if a["image_id"] in ids])
    write_coco(root / "train.json", *pick({im["id"] for im in images} - test_ids), categories=COCO_CATEGORIES[:2])
    write_coco(root / "test.json", *pick(test_ids))
    assert is_coco_source(root)
    train, test = _coco(root, tmp_path)
    assert train.classes == ["background", "cat", "dog", "kite"], "the union of both files' categories"
    assert sorted(Path(p).name for p in test.images.paths) == ["p2.png", "p6.jpg"] and len(train) == 4
    assert not train.class_presence()[:, 3].any() and test.class_presence()[:, 3].any()
    assert train.sources["split"] == "train/test files"
    write_coco(root / "test.json", *pick(test_ids | {100}))
    with pytest.raises(DataError, match=r"train\.json and test\.json both name 1 image\(s\) .*e\.g\. p1\.jpg"):
        _coco(root, tmp_path)


def test_coco_layout_finds_each_splits_image_folder_by_its_name(tmp_path):
    root = tmp_path / "coco"
    drawn, images, anns = coco_images_and_annotations()
    split = {d.file: ("val2017" if k % 3 == 0 else "train2017") for k, d in enumerate(drawn)}
    for d in drawn:
        draw_image(root / split[d.file] / d.file, d, "L" if d.grey else "RGB")
    for name in ("train2017", "val2017"):
        ims = [im for im in images if split[im["file_name"]] == name]
        ids = {im["id"] for im in ims}
        write_coco(root / "annotations" / f"instances_{name}.json", ims, [a for a in anns if a["image_id"] in ids])
    assert is_coco_source(root) and is_dense_source(str(root))
    train, test = load_dense(DataConfig(name=str(root), image_size=SIZE, cache_dir=_cache(tmp_path)))
    assert {Path(p).parent.name for p in train.images.paths} == {"train2017"}
    assert {Path(p).parent.name for p in test.images.paths} == {"val2017"} and len(test) == 2


def test_coco_boxes_only_and_annotations_without_segmentation(tmp_path):
    root = tmp_path / "coco"
    drawn, images, anns = _coco_folder(root)
    bare = [{k: v for k, v in a.items() if k != "segmentation"} for a in anns]
    train, test = _coco(write_coco(root / "boxes.json", images, bare), tmp_path)
    assert train.masks is None and train.has_boxes and not train.has_masks
    mixed = [a if a["id"] != 7 else bare[-1] for a in anns]  # p6's dog without segmentation
    train, test = _coco(write_coco(root / "mixed.json", images, mixed), tmp_path)
    ds = train if any(p.endswith("p6.jpg") for p in train.images.paths) else test
    i = [Path(p).name for p in ds.images.paths].index("p6.jpg")
    mask = ds.masks.batch([i])[0]
    assert not (mask == 2).any() and (mask == 255).sum() > 0.25 * S * S, \
        "an unsegmented object's box is ignored in the mask, neither background nor a class"


# ---------------------------------------------------------------------------------------------- cache


def _manifest(ds) -> dict:
    return json.loads((Path(ds.sources["cache"]["path"]) / "manifest.json").read_text())


def test_the_cache_is_reused_without_parsing_and_rebuilt_when_annotations_change(tmp_path, monkeypatch):
    root = tmp_path / "coco"
    drawn, images, anns = _coco_folder(root)
    path = write_coco(root / "ann.json", images, anns)
    first, _ = _coco(path, tmp_path)
    built = _manifest(first)["build"]["created"]
    cache = Path(first.sources["cache"]["path"])
    assert cache.name.startswith(Path(first.images.source).name + ".dense-") and cache.parent == Path(
        first.images.source).parent, "beside the image cache"
    with monkeypatch.context() as m:
        m.setattr(coco_mod, "_parse", lambda *a: pytest.fail("a reused cache needs no parse of the JSON"))
        again, _ = _coco(path, tmp_path)
    assert again.sources["cache"]["action"] == "reused" and _manifest(again)["build"]["created"] == built
    assert torch.equal(again.boxes, first.boxes) and torch.equal(again.masks.images, first.masks.images)
    anns[1]["bbox"] = [6, 4, 40, 40]
    write_coco(path, images, anns)
    changed, _ = _coco(path, tmp_path)
    assert changed.sources["cache"]["action"] == "rebuilt (1 annotation file(s) changed)"
    i = [Path(p).name for p in changed.images.paths].index("p1.jpg")
    assert changed.boxes_of(i)[0][0].tolist() == pytest.approx([6 / 64, 4 / 48, 46 / 64, 44 / 48])

    voc = make_voc(tmp_path / "voc")
    _voc(voc, tmp_path)
    assert _voc(voc, tmp_path)[0].sources["cache"]["action"] == "reused"
    save_palette(voc / "SegmentationClass" / "a.png", id_array((64, 48), [(2, (8, 6, 30, 30))]))
    train, _ = _voc(voc, tmp_path)
    assert train.sources["cache"]["action"].startswith("rebuilt")
    assert set(torch.unique(train.masks.batch([0])).tolist()) == {0, 2}


def test_a_failed_rebuild_leaves_the_previous_cache_and_no_half_one(tmp_path, monkeypatch):
    root = tmp_path / "coco"
    drawn, images, anns = _coco_folder(root)
    path = write_coco(root / "ann.json", images, anns)
    first, _ = _coco(path, tmp_path)
    cache = Path(first.sources["cache"]["path"])
    before = (cache / "manifest.json").read_bytes()
    calls = []

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill in the middle of writing the masks
        return squash(*a)

    squash = dense_cache._squash
    monkeypatch.setattr(dense_cache, "_squash", interrupted)
    anns[0]["area"] = 1.0
    write_coco(path, images, anns)
    with pytest.raises(KeyboardInterrupt):
        _coco(path, tmp_path)
    monkeypatch.undo()
    assert (cache / "manifest.json").read_bytes() == before
    assert not list(cache.parent.glob(".tmp-*")), "the temporary build is removed"
    bad = [dict(a, bbox=[50, 4, 20, 10]) if a["id"] == 1 else a for a in anns]
    write_coco(path, images, bad)
    with pytest.raises(DataError, match="annotation 1 of ann.json"):
        _coco(path, tmp_path)
    assert (cache / "manifest.json").read_bytes() == before and not list(cache.parent.glob(".tmp-*"))
    killed = cache.parent / f".tmp-{cache.name}-999999-dead"  # what a SIGKILL during a build leaves
    (killed / "masks.u8").parent.mkdir()
    (killed / "masks.u8").write_bytes(b"half")
    write_coco(path, images, anns)
    assert _coco(path, tmp_path)[0].sources["cache"]["action"].startswith("rebuilt")
    assert not killed.exists(), "the next build removes what a killed one left"


# ------------------------------------------------------------------------------------------ bad input


def test_a_mask_whose_size_differs_from_its_image(tmp_path):
    root = make_voc(tmp_path / "voc")
    save_palette(root / "SegmentationClass" / "b.png", id_array((40, 40), []))
    with pytest.raises(DataError, match=r"SegmentationClass/b\.png: its annotation is 40×40 px but its image "
                                        r".*JPEGImages/b\.png is 50×70 px"):
        _voc(root, tmp_path)


def test_a_coco_image_whose_stated_size_differs_from_the_file(tmp_path):
    root = tmp_path / "coco"
    drawn, images, anns = _coco_folder(root)
    images[2]["width"] = 41
    with pytest.raises(DataError, match=r"ann\.json image p3\.png: its annotation is 41×40 px but its image "
                                        r".*images/p3\.png is 40×40 px"):
        _coco(write_coco(root / "ann.json", images, anns), tmp_path)


def test_a_detection_folder_of_xml_boxes_keeps_images_without_boxes(tmp_path):
    """JPEGImages + Annotations only (no masks): boxes, no masks; an image without an XML file is kept with no
    boxes; object names that are not VOC's become the classes in sorted order."""
    root = tmp_path / "det"
    names = {1: "zebra", 2: "apple", 3: "mango"}
    drawn = [d for d in VOC_IMAGES if d.stem != "g"]
    for d in drawn:
        draw_image(root / "JPEGImages" / d.file, d, "L" if d.grey else "RGB")
        if d.rects:
            voc_xml(root / "Annotations" / f"{d.stem}.xml", d, names)
    assert is_voc_folder(root)
    train, test = _voc(root, tmp_path)
    assert train.masks is None and train.has_boxes
    assert train.classes == ["background", "apple", "zebra"], "the XML names, sorted"
    by = {d.stem: d for d in drawn}
    relabel = {1: 2, 2: 1}  # zebra → 2, apple → 1
    for ds in (train, test):
        for i, stem in enumerate(_stems(ds)):
            d = by[stem]
            _check_image(ds, i, Drawn(d.stem, d.file, d.size, [(relabel[c], r) for c, r in d.rects]))
    assert "e" in _stems(train) + _stems(test), "an image without an XML file is kept, with no boxes"


def test_recognising_a_large_coco_file_reads_only_its_head(tmp_path, monkeypatch):
    images = [{"id": k, "file_name": f"{k:06d}.jpg", "width": 640, "height": 480} for k in range(40000)]
    path = write_coco(tmp_path / "big.json", images, [coco_annotation(1, 0, 3, (1, 1, 5, 5))])
    assert path.stat().st_size > 2 * coco_mod.PEEK_BYTES
    monkeypatch.setattr(coco_mod, "_parse", lambda *a, **k: pytest.fail("parsed to recognise it"))
    assert is_coco_source(path)
    assert coco_mod._peek_names(path, {})[:2] == ["000000.jpg", "000001.jpg"], "names from the head, unparsed"


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(category_id=99), r"ann\.json: annotation 1 has category_id 99, not one of .*\[3, 7, 12\]"),
    (lambda a: a.update(bbox=[50, 4, 20, 10]), r"annotation 1 of ann\.json \(image p1\.jpg\), bbox \[x, y, w, h\] = "
                                               r"\[50\.0, 4\.0, 20\.0, 10\.0\]: .* outside its 64×48 image"),
    (lambda a: a.update(bbox=[4, 4, 0, 10]), r"annotation 1 of ann\.json .* has no area"),
    (lambda a: a.update(bbox=[4, 4, -3, 10]), r"annotation 1 of ann\.json .* has no area"),
    (lambda a: a.update(image_id=555), r"annotation 1 refers to image id 555"),
])
def test_bad_coco_annotations_name_the_annotation(tmp_path, change, message):
    root = tmp_path / "coco"
    drawn, images, anns = _coco_folder(root)
    change(anns[1])
    with pytest.raises(DataError, match=message):
        _coco(write_coco(root / "ann.json", images, anns), tmp_path)


def test_a_box_within_a_pixel_outside_is_clipped(tmp_path):
    root = tmp_path / "coco"
    drawn, images, anns = _coco_folder(root)
    anns[1]["bbox"] = [-0.6, 4, 64.9, 44.5]  # x from -0.6 to 64.3 in a 64-wide image; y to 48.5 of 48
    train, test = _coco(write_coco(root / "ann.json", images, anns), tmp_path)
    ds = train if any(p.endswith("p1.jpg") for p in train.images.paths) else test
    i = [Path(p).name for p in ds.images.paths].index("p1.jpg")
    assert ds.boxes_of(i)[0][0].tolist() == pytest.approx([0.0, 4 / 48, 1.0, 1.0])


def test_a_voc_box_outside_its_image(tmp_path):
    root = make_voc(tmp_path / "voc")
    xml = root / "Annotations" / "a.xml"
    xml.write_text(xml.read_text().replace("<xmax>60</xmax>", "<xmax>70</xmax>"))
    with pytest.raises(DataError, match=r"Annotations/a\.xml object 2 \(bicycle.*reaches outside its 64×48 image"):
        _voc(root, tmp_path)


def test_a_coco_file_naming_missing_images(tmp_path):
    root = tmp_path / "coco"
    drawn, images, anns = _coco_folder(root)
    ghosts = [{"id": 900 + k, "file_name": f"ghost{k}.jpg", "width": 10, "height": 10} for k in range(7)]
    path = write_coco(root / "ann.json", images + ghosts, anns)
    with pytest.raises(DataError, match=r"7 of the 13 images it names are missing: ghost0\.jpg, ghost1\.jpg, .*, …; "
                                        r"looked in .*coco, .*coco/images, .*--data-root"):
        _coco(path, tmp_path)
    (root / "images" / "sub").mkdir()  # the sample (the first 20 names) finds images/; a ghost after it is
    many = []                                 # found when building, against the image cache's listing
    for k in range(24):
        d = drawn[k % len(drawn)]
        shutil.copy(root / "images" / d.file, root / "images" / "sub" / f"{k}_{d.file}")
        many.append({"id": k, "file_name": f"sub/{k}_{d.file}", "width": d.size[0], "height": d.size[1]})
    many.append({"id": 999, "file_name": "ghost.jpg", "width": 10, "height": 10})
    path = write_coco(root / "many.json", many, [dict(anns[0], image_id=0)])
    with pytest.raises(DataError, match=r"1 of the 25 images it names are missing: ghost\.jpg; looked in"):
        _coco(path, tmp_path)


@pytest.mark.parametrize("text, message", [
    ("", r"ann\.json is empty"),
    ('{"images": [{"id": 1, "file_name": "p1.jpg", "width": 64', r"ann\.json is not valid JSON: .* line 1"),
    (json.dumps({"images": [], "annotations": [], "categories": COCO_CATEGORIES}), r"its images list is empty"),
    (json.dumps({"images": [{"id": 1, "file_name": "p1.jpg", "width": 64, "height": 48}], "annotations": [],
                 "categories": COCO_CATEGORIES}), r"it has no annotations at all"),
    (json.dumps({"images": [{"id": 1, "file_name": "p1.jpg", "width": 64, "height": 48}]}),
     r"no 'annotations' list"),
])
def test_empty_invalid_or_incomplete_coco_files(tmp_path, text, message):
    root = tmp_path / "coco"
    _coco_folder(root)
    (root / "ann.json").write_text(text)
    assert is_coco_source(root / "ann.json"), "recognised, so that the error says what is wrong with it"
    with pytest.raises(DataError, match=message):
        load_dense(DataConfig(name=str(root / "ann.json"), image_size=SIZE, cache_dir=_cache(tmp_path)))


def test_a_stem_in_both_split_lists(tmp_path):
    root = make_voc(tmp_path / "voc")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("g\nh\na\n")
    with pytest.raises(DataError, match=r"1 image\(s\) are listed in both splits .*e\.g\. a;"):
        _voc(root, tmp_path)


def test_recognising_sources(tmp_path):
    make_voc(tmp_path / "voc")
    assert is_voc_folder(tmp_path / "voc") and not is_coco_source(tmp_path / "voc")
    plain = tmp_path / "plain"
    draw_image(plain / "cat" / "a.jpg", Drawn("a", "a.jpg", (20, 20)))
    assert not is_voc_folder(plain) and not is_coco_source(plain) and not is_dense_source(str(plain))
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    (tmp_path / "config.json").write_text('{"lr": 0.1}')
    assert not is_coco_source(tmp_path / "list.json") and not is_coco_source(tmp_path / "config.json")


# ------------------------------------------------------------------------------------------ pretraining


def test_pretraining_on_a_voc_folder_sees_only_its_training_images_unlabelled(tmp_path):
    root = make_voc(tmp_path / "voc")
    train, test = load_dataset(DataConfig(name=str(root), image_size=SIZE, cache_dir=_cache(tmp_path)))
    assert train.labels is None and test.labels is None
    assert [Path(p).stem for p in train.paths] == [s for s in VOC_TRAIN if s != "f"]
    assert [Path(p).stem for p in test.paths] == VOC_TEST
    assert all("/JPEGImages/" in p for p in train.paths + test.paths), "mask PNGs are never images"
    coco = tmp_path / "coco"
    drawn, images, anns = _coco_folder(coco)
    train, test = load_dataset(DataConfig(name=str(write_coco(coco / "ann.json", images, anns)), image_size=SIZE,
                                          cache_dir=_cache(tmp_path)))
    assert len(train) == 5 and len(test) == 1 and train.labels is None and train.stored_size == S
