"""Near-duplicate groups on real clip art with planted copies: precision and recall before and after the pixel check.

    OMP_NUM_THREADS=1 python benchmarks/duplicates/planted.py [--distinct 1000] [--sources 120] [--json FILE]

The folder (``plant.py``): distinct clip-art images of Debian's ``openclipart-png`` and, for some of them, copies
resized to 60 %, re-encoded as JPEG quality 60, cropped to their 90 % centre, mirrored, and combinations. Two
encoders are pretrained on the folder itself, as a user would before deduplicating it: SimCLR on a small ResNet
at 32 px, (a) one epoch of 36 steps — the issue's encoder — and (b) ten epochs (360 steps). For each, the groups
of ``find_duplicates`` at the issue's threshold 0.98, the former default 0.95 and ``auto``, by the embedding alone
and pixel-verified, scored as

- pairs: every pair inside a found group against every pair inside a planted group (precision, recall);
- groups: planted groups found whole (some group holds all of it), groups that mix images of different planted
  groups or unplanted images (``mixed``), the largest group.

Then the pixel signals side by side on the candidate pairs at cosine ≥ 0.85, planted pairs against the rest: the
thumbnail correlation as ``find_duplicates`` computes it, and from the cache records of 32, 48 and 64 px encoders
(43, 64 and 85 px records); dHash and pHash (imagehash) and SSIM of 32 px grey thumbnails (scikit-image), when
installed, over the same crop and mirror variants. And other rules for ``auto``, on the same nearest-neighbour
similarities.
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plant import Planted, on_white, plant  # noqa: E402

from selfsup.eval.duplicates import AUTO_CAP, find_duplicates, nearest_similarity  # noqa: E402
from selfsup.eval.embed import embed_folder  # noqa: E402
from selfsup.eval.neighbors import candidate_pairs, centred_unit  # noqa: E402
from selfsup.data.cache import load_image_folder  # noqa: E402
from selfsup.eval.pixel_check import (COMBOS, MIN_RECORD_SIDE, PixelCheck, pair_correlations,  # noqa: E402
                                      pixel_similarity, thumbnails)
from selfsup.train.rundir import load_run  # noqa: E402


def pretrain_on(folder: Path, run_dir: Path, epochs: int, batch: int, cache_dir: Path) -> float:
    from selfsup.config import config_from_dict
    from selfsup.train.loop import pretrain

    cfg = config_from_dict({
        "method": {"name": "simclr", "params": {"proj_hidden": 64, "proj_dim": 32}},
        "backbone": {"name": "small_resnet", "params": {"widths": [16, 32, 64, 128, 256]}},
        "data": {"name": str(folder), "val_size": 20, "image_size": 32, "cache_dir": str(cache_dir)},
        "optim": {"name": "sgd", "lr": 0.05},
        "train": {"epochs": epochs, "batch_size": batch, "device": "cpu", "progress": False, "knn_every": 0,
                  "threads": 1}})
    t0 = time.perf_counter()
    pretrain(cfg, run_dir, overwrite=True)
    return time.perf_counter() - t0


def pairs_of(groups: list[list[int]]) -> set[tuple[int, int]]:
    return {(a, b) for g in groups for a, b in itertools.combinations(sorted(g), 2)}


def score(groups: list[list[int]], truth: list[list[int]]) -> dict[str, Any]:
    found, true = pairs_of(groups), pairs_of(truth)
    owner = {i: k for k, g in enumerate(truth) for i in g}
    mixed = [g for g in groups if len({owner.get(i, -1 - i) for i in g}) > 1]
    return {"pairs_found": len(found), "precision": len(found & true) / len(found) if found else float("nan"),
            "recall": len(found & true) / len(true), "planted_found": sum(any(set(t) <= set(g) for g in groups)
                                                                           for t in truth),
            "groups": len(groups), "mixed": len(mixed), "largest": max(map(len, groups), default=0)}


def rows_for(name: str, emb, truth: list[list[int]]) -> list[dict[str, Any]]:
    """At 0.98, 0.95 and auto: the embedding's groups and the pixel-verified ones (auto: the embedding alone gets
    its own rule, the outlier fence, and the verified run's lower threshold is shown by the embedding too)."""
    rows = []

    def row(threshold: str, stage: str, res, groups, seconds: float | None, failed: int | None) -> dict[str, Any]:
        return {"encoder": name, "threshold": threshold, "stage": stage, "candidates": res.candidate_pairs,
                "failed": failed, "seconds": seconds, **score(groups, truth)}

    for threshold in (0.98, 0.95, "auto"):
        t0 = time.perf_counter()
        res = find_duplicates(emb.vectors, threshold, emb.images, PixelCheck())
        seconds = round(time.perf_counter() - t0, 1)
        label = f"auto = {res.threshold:.4f} (10th pct)" if threshold == "auto" else f"{threshold}"
        if threshold == "auto":
            alone = find_duplicates(emb.vectors, "auto", None, None)
            rows.append(row(f"auto = {alone.threshold:.4f} (fence)", "embedding", alone, alone.groups, None, None))
        rows.append(row(label, "embedding", res, res.embedding_groups, None, None))
        rows.append(row(label, "+ pixel check", res, res.groups, seconds, res.failed_pairs))
    return rows


SIGNAL_SAMPLE = 4000
"""Unplanted candidate pairs (a random sample) the per-pair signals (hashes, SSIM) are measured on."""


def signal_table(emb, truth: list[list[int]], threshold: float, cache_dir: str) -> dict[str, Any]:
    """Each pixel signal on the candidate pairs at ``threshold``, planted against the others: the thumbnail
    correlation used (from the cache records and from the decoded files), dHash and pHash (imagehash) and SSIM of
    32 px grey thumbnails (scikit-image), each over the same crop and mirror variants, when installed."""
    from PIL import Image, ImageOps

    x, at_mean = centred_unit(emb.vectors)
    pairs, _ = candidate_pairs(x, at_mean, threshold)
    true = pairs_of(truth)
    is_true = np.array([(a, b) in true for a, b in pairs.tolist()], dtype=bool)
    other = np.nonzero(~is_true)[0]
    sample = np.sort(np.concatenate([np.nonzero(is_true)[0], np.random.default_rng(0).permutation(other)[:SIGNAL_SAMPLE]]))
    out: dict[str, Any] = {"threshold": threshold, "candidate_pairs": len(pairs), "planted": int(is_true.sum())}
    scores: dict[str, tuple[np.ndarray, np.ndarray, list[float]]] = {}  # name -> (scores, planted mask, cut-offs)
    used = "records" if emb.images.stored_size >= MIN_RECORD_SIDE else "files decoded again"
    scores[f"thumbnail correlation as used ({used})"] = (pixel_similarity(emb.images, pairs).numpy(), is_true,
                                                         [0.9, 0.95])
    for size in (32, 48, 64):  # the cache records of encoders of these image sizes, used whatever their side
        records = load_image_folder(Path(emb.meta["folder"]), size, cache_dir=cache_dir, progress=False)
        assert records.paths == emb.paths
        unique = torch.unique(pairs[sample].flatten())
        where = torch.full((int(unique.max()) + 1,), -1, dtype=torch.long)
        where[unique] = torch.arange(len(unique))
        thumbs = thumbnails(records.batch(unique.tolist()))
        scores[f"thumbnail correlation, {records.stored_size} px records"] = (
            pair_correlations(thumbs, where[pairs[sample]]).numpy(), is_true[sample], [0.9, 0.95])

    def record(i: int) -> Image.Image:
        r = emb.images.batch([i]).numpy()[0]
        return Image.fromarray(r[0] if r.shape[0] == 1 else r.transpose(1, 2, 0))

    def from_file(i: int) -> Image.Image:
        with Image.open(emb.paths[i]) as im:
            return on_white(im).resize((64, 64), Image.BICUBIC)

    def variants(img: Image.Image) -> list[Image.Image]:
        w, h = img.size
        dw, dh = round(w * 0.05), round(h * 0.05)
        crop = img.crop((dw, dh, w - dw, h - dh))
        return [img, crop, ImageOps.mirror(img), ImageOps.mirror(crop)]

    some = pairs[sample]
    index = sorted(set(some.flatten().tolist()))

    def per_pair(load, feature, compare) -> np.ndarray:
        table = {i: [feature(v) for v in variants(load(i))] for i in index}
        return np.array([max(compare(table[a][va], table[b][vb]) for va, vb in COMBOS) for a, b in some.tolist()])

    def grey(img: Image.Image) -> np.ndarray:
        return np.asarray(img.convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float64)

    def corr(u: np.ndarray, v: np.ndarray) -> float:
        u, v = u.ravel() - u.mean(), v.ravel() - v.mean()
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v) + 1e-9))

    scores["thumbnail correlation, decoded files"] = (per_pair(from_file, grey, corr), is_true[sample], [0.9, 0.95])
    try:
        import imagehash

        for name, fn in (("dHash", imagehash.dhash), ("pHash", imagehash.phash)):
            scores[f"{name} bits in common, cache records"] = (
                per_pair(record, fn, lambda h, g: 64 - (h - g)), is_true[sample], [56, 58])
    except ImportError:
        pass
    try:
        from skimage.metrics import structural_similarity

        scores["SSIM, 32 px thumbnails"] = (per_pair(record, grey, lambda u, v: structural_similarity(
            u, v, data_range=255)), is_true[sample], [0.8, 0.9])
    except ImportError:
        pass
    rows = {}
    for name, (d, planted, cuts) in scores.items():
        pos, neg = d[planted], d[~planted]
        row: dict[str, Any] = {"pairs": len(d), "planted worst": float(pos.min()) if len(pos) else None,
                               "others best": float(neg.max()) if len(neg) else None,
                               "others 99.9%": float(np.percentile(neg, 99.9)) if len(neg) else None}
        row["planted kept / others passing"] = "; ".join(f"≥ {c:g}: {(pos >= c).mean():.3f} / {int((neg >= c).sum())}"
                                                         for c in cuts)
        rows[name] = row
    out["signals"] = rows
    return out


def auto_rules(emb, truth: list[list[int]]) -> list[dict[str, Any]]:
    """Rules for ``auto`` on the same nearest-neighbour similarities: quantiles, scored after the pixel check, and
    outlier fences, scored by the embedding alone."""
    x, at_mean = centred_unit(emb.vectors)
    nn = nearest_similarity(x, at_mean).double()
    q = lambda p: float(torch.quantile(nn, p))  # noqa: E731
    q1, q2, q3 = q(0.25), q(0.5), q(0.75)
    mad = float((nn - q2).abs().median())
    rules = [("5th percentile", q(0.05), True), ("10th percentile (used, with the pixel check)", q(0.1), True),
             ("Q1", q1, True), ("median", q2, True),
             ("Q3 + 1.5 IQR", q3 + 1.5 * (q3 - q1), False), ("Q3 + 3 IQR (used, embedding alone)", q3 + 3 * (q3 - q1), False),
             ("median + 3.5 x 1.4826 MAD", q2 + 3.5 * 1.4826 * mad, False)]
    rows = []
    for name, t, verified in rules:
        t = min(t, AUTO_CAP)
        t0 = time.perf_counter()
        res = find_duplicates(emb.vectors, t, emb.images, PixelCheck() if verified else None)
        rows.append({"rule": name, "stage": "+ pixel check" if verified else "embedding", "threshold": round(t, 4),
                     "candidates": res.candidate_pairs, "seconds": round(time.perf_counter() - t0, 1),
                     **score(res.groups, truth)})
    return rows


def markdown(rows: list[dict[str, Any]], keys: list[str]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "" if v is None else str(v)

    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                     + ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distinct", type=int, default=1000)
    parser.add_argument("--sources", type=int, default=120, help="distinct images that get planted copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = args.keep or Path(tempfile.mkdtemp(prefix="dups-"))
    t0 = time.perf_counter()
    try:
        planted: Planted = plant(work / "folder", args.distinct, args.sources, args.seed)
        n = len(list((work / "folder").iterdir()))
        steps = 36
        batch = (n - 20) // steps
        print(f"{n} images: {args.distinct} distinct, {len(planted.groups)} planted groups; batch {batch} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        cpu = subprocess.run("lscpu | grep -o avx512_bf16 | head -1", shell=True, capture_output=True, text=True)
        results: dict[str, Any] = {"images": n, "distinct": args.distinct, "planted_groups": len(planted.groups),
                                   "cpu": "AVX-512 with bf16" if cpu.stdout.strip() else "AVX2 (no avx512_bf16)",
                                   "rows": [], "signals": {}, "auto_rules": {}}
        for name, epochs in (("36 steps (1 epoch)", 1), ("360 steps (10 epochs)", 10)):
            seconds = pretrain_on(planted.folder, work / f"run{epochs}", epochs, batch, work / "cache")
            emb = embed_folder(load_run(work / f"run{epochs}"), planted.folder)
            index = {p: i for i, p in enumerate(emb.paths)}
            truth = [sorted(index[str(p)] for p in g) for g in planted.groups]
            print(f"{name}: pretrained in {seconds:.0f} s", flush=True)
            results["rows"] += rows_for(name, emb, truth)
            results["signals"][name] = signal_table(emb, truth, 0.85, str(work / "cache"))
            results["auto_rules"][name] = [{"encoder": name, **r} for r in auto_rules(emb, truth)]
        results["seconds"] = round(time.perf_counter() - t0)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{results['images']} images ({results['distinct']} distinct, {results['planted_groups']} planted groups), "
          f"CPU: {results['cpu']}, {results['seconds']} s\n")
    print(markdown(results["rows"], ["encoder", "threshold", "stage", "candidates", "failed", "seconds", "pairs_found",
                                     "precision", "recall", "planted_found", "groups", "mixed", "largest"]))
    for name, sig in results["signals"].items():
        print(f"\npixel signals on the {sig['candidate_pairs']} candidate pairs at cosine ≥ {sig['threshold']} "
              f"({sig['planted']} planted; per-pair signals on all planted and {SIGNAL_SAMPLE} others), {name}:\n")
        print(markdown([{"signal": k, **v} for k, v in sig["signals"].items()],
                       ["signal"] + list(next(iter(sig["signals"].values())).keys())))
    print("\nrules for --threshold auto:\n")
    print(markdown([r for rows in results["auto_rules"].values() for r in rows],
                   ["encoder", "rule", "stage", "threshold", "candidates", "seconds", "precision", "recall",
                    "planted_found", "mixed", "largest"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
