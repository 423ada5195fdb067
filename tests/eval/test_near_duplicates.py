"""Near-duplicate groups on a folder of distinct real images with planted near-duplicates.

The folder: non-overlapping crops of scikit-learn's two sample photos at five tile sizes (textured,
unlike-looking tiles only), resaved at 40–96 px as RGB/grayscale JPEG, RGBA PNG and palette PNG, and
8×8 digits upscaled to 24–64 px (grayscale PNG) whose shapes differ; then 12 planted groups (8 pairs,
4 triples) of one source image and its edits: re-encoded JPEG (quality 70), resized to 90%, 5% brighter,
PNG copy. The encoder is SimCLR trained on the folder itself for 3 epochs (a few seconds), as a user
would before deduplicating a folder.

Measured (2026-11-30, 5 pairs of folder and training seeds): centred cosine within planted groups ≥ 0.989,
between distinct images ≤ 0.951; at threshold 0.98 (the one of the issue) every planted group came out
exactly, and nothing else. On the same embeddings the old criterion (connected components of the raw
cosine ≥ 0.98) put all 209 images into one group.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch.nn.functional as F
from PIL import Image, ImageEnhance

from selfsup.cli import main
from selfsup.eval.embed import embed_folder
from selfsup.eval.neighbors import duplicate_groups
from selfsup.train.rundir import load_run


def _thumbnail_filter():
    """A function telling whether an image looks unlike every image it accepted before: its 8×8
    thumbnail pattern (centred, unit norm) correlates at most ``bound`` with each kept one, and its 4×4
    colour layout differs by ≥ ``layout`` grey levels on average (0 disables the colour check)."""
    patterns: list[np.ndarray] = []
    layouts: list[np.ndarray] = []

    def accept(pixels: np.ndarray, bound: float, layout: float = 0.0) -> bool:
        img = Image.fromarray(pixels)
        thumb = np.asarray(img.resize((8, 8), Image.BILINEAR), dtype=np.float64).ravel()
        small = np.asarray(img.convert("RGB").resize((4, 4), Image.BILINEAR), dtype=np.float64).ravel()
        v = thumb - thumb.mean()
        v /= np.linalg.norm(v) + 1e-9
        if any(len(k) == len(v) and float(v @ k) > bound for k in patterns):
            return False
        if any(np.abs(small - s).mean() < layout for s in layouts):
            return False
        patterns.append(v)
        layouts.append(small)
        return True

    return accept


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        out.load()
        return out.copy()


THRESHOLD = 0.98
"""The threshold of the issue (3,851 of 4,261 images in one group with the old criterion)."""

EDITS = {
    "jpeg": lambda b: _jpeg(b, 70),
    "resize": lambda b: b.resize((round(b.width * 0.9), round(b.height * 0.9)), Image.BICUBIC),
    "bright": lambda b: ImageEnhance.Brightness(b).enhance(1.05),
    "png": lambda b: b.copy(),
}
# The brightness edit goes to photos: an 8×8 digit upscaled and brightened moved, for this small encoder,
# about as far as another digit shape (measured), and 8% brighter photos fell to 0.92–0.96 — which says
# more about a 3-epoch encoder than about grouping.
PHOTO_EDITS = [["jpeg"], ["bright"], ["resize"], ["png"], ["bright", "jpeg"], ["resize", "png"]]
DIGIT_EDITS = [["jpeg"], ["resize"], ["png"], ["jpeg"], ["resize", "png"], ["jpeg", "resize"]]


def planted_folder(root: Path, seed: int = 0) -> list[list[Path]]:
    """Write the folder (see the module docstring); returns the planted groups, source first."""
    from sklearn.datasets import load_digits, load_sample_images

    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    accept = _thumbnail_filter()
    photos: list[Path] = []
    modes = ["RGB", "L", "RGBA", "P"]
    for p, photo in enumerate(load_sample_images().images):  # (427, 640, 3) each
        gray = photo.mean(axis=2)
        top = 0
        for side in (32, 48, 64, 96, 48, 32, 64, 32):  # rows of square tiles: no two crops overlap
            for left in range(0, photo.shape[1] - side + 1, side):
                patch = gray[top : top + side, left : left + side]
                # mean absolute gradient: flat sky and defocused background look alike wherever they are cut
                if (np.abs(np.diff(patch, axis=0)).mean() + np.abs(np.diff(patch, axis=1)).mean()) / 2 < 3:
                    continue
                tile = photo[top : top + side, left : left + side]
                if not accept(tile, 0.7, layout=20):
                    continue
                img = Image.fromarray(tile).resize((int(rng.integers(40, 97)),) * 2, Image.BICUBIC)
                mode = modes[len(photos) % 4]
                img = img.quantize(64) if mode == "P" else img.convert(mode)
                path = root / f"photo{p}_{side}_{top}_{left}.{'jpg' if mode in ('RGB', 'L') else 'png'}"
                img.save(path)
                photos.append(path)
            top += side
    digits: list[Path] = []
    for i, d in enumerate(load_digits().images):
        pixels = (d * 255 / 16).astype(np.uint8)
        if not accept(pixels, 0.8):  # two scans of one digit shape would be near-duplicates themselves
            continue
        size = (24, 32, 48, 64)[len(digits) % 4]
        path = root / f"digit_{i:04d}.png"
        Image.fromarray(pixels, "L").resize((size, size), Image.BILINEAR).save(path)
        digits.append(path)
        if len(digits) == 200:
            break
    plan = ([(photos[i], e) for i, e in zip(rng.choice(len(photos), len(PHOTO_EDITS), replace=False), PHOTO_EDITS)]
            + [(digits[i], e) for i, e in zip(rng.choice(len(digits), len(DIGIT_EDITS), replace=False), DIGIT_EDITS)])
    groups = []
    for n, (src, edits) in enumerate(plan):
        with Image.open(src) as im:
            base = im.convert("RGB") if im.mode in ("P", "RGBA") else im.copy()
        group = [src]
        for e in edits:
            out = root / f"dup{n:02d}_{e}_{src.stem}.{'jpg' if e == 'jpeg' else 'png'}"
            EDITS[e](base).save(out)
            group.append(out)
        groups.append(group)
    return groups


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path, list[list[Path]]]:
    """(folder, run directory, planted groups)."""
    from selfsup.config import config_from_dict
    from selfsup.train.loop import pretrain

    base = tmp_path_factory.mktemp("dups")
    groups = planted_folder(base / "folder")
    cfg = config_from_dict({
        "method": {"name": "simclr", "params": {"proj_hidden": 64, "proj_dim": 32}},
        "backbone": {"name": "small_resnet", "params": {"widths": [16, 32, 64, 128, 256]}},
        "data": {"name": str(base / "folder"), "val_size": 20, "image_size": 32},
        "optim": {"name": "sgd", "lr": 0.05},
        "train": {"epochs": 3, "batch_size": 64, "device": "cpu", "progress": False, "knn_every": 0, "threads": 1}})
    pretrain(cfg, base / "run")
    return base / "folder", base / "run", groups


def test_planted_near_duplicates_are_found_without_chaining(planted) -> None:
    folder, run_dir, planted_groups = planted
    emb = embed_folder(load_run(run_dir), folder)
    index = {p: i for i, p in enumerate(emb.paths)}
    truth = [sorted(index[str(p)] for p in g) for g in planted_groups]
    groups = duplicate_groups(emb.vectors, THRESHOLD)
    found = [t for t in truth if any(set(t) <= set(g) for g in groups)]
    print(f"{len(emb.paths)} images, {len(truth)} planted groups, {len(found)} found, {len(groups)} groups, "
          f"sizes {sorted(map(len, groups), reverse=True)}")
    assert len(emb.paths) >= 200
    assert found == truth
    assert max(map(len, groups)) <= max(map(len, truth))

    # The folder does exercise chaining: the old criterion (connected components of the raw cosine
    # graph at the same threshold) joins most of it into one group.
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    raw = F.normalize(emb.vectors, dim=1)
    _, component = connected_components(csr_matrix((raw @ raw.T >= THRESHOLD).numpy()), directed=False)
    assert np.bincount(component).max() > len(emb.paths) / 2


def test_neighbors_cli_duplicates_on_the_planted_folder(planted, capsys) -> None:
    folder, run_dir, planted_groups = planted
    command = ["neighbors", str(run_dir), "--data", str(folder), "--duplicates", "--threshold", str(THRESHOLD)]
    assert main(command + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    groups = [set(g) for g in out["groups"]]
    assert out["threshold"] == THRESHOLD and "centred" in out["criterion"]
    for planted_group in planted_groups:
        assert any({str(p) for p in planted_group} <= g for g in groups)
    assert max(map(len, groups)) <= 3

    assert main(command) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{len(groups)} group(s) of near-duplicates among {out['images']} images")
    assert text.count("\ngroup ") == len(groups) and str(planted_groups[0][0]) in text
