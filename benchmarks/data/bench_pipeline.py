"""Data-pipeline speed: selfsup's folder cache + batched augmentation against torchvision's ImageFolder.

Generates a synthetic folder of JPEGs (crops of scikit-learn's two sample photos, 160–256 px on the
longer side, aspect 0.6–1.7, 10 class folders) in a temporary directory (deleted after), then,
side by side in one run with interleaved repeats:

1. **Decoding a cache**: ~2,000 JPEGs decoded into records by a process pool vs a thread pool of the
   same size (and one process, for reference).
2. **Pipeline images/s** at each output size: reading a batch → random-resized crop + flip → float
   tensor on the device (here the CPU). selfsup: the cache (its build is the first epoch), read through
   the prefetch thread, one batched ``resized_crop_flip`` with the images' aspect ratios. torchvision:
   ``ImageFolder`` + ``DataLoader`` with ``RandomResizedCrop(size)`` + ``RandomHorizontalFlip`` +
   ``ToTensor``, the same number of workers (persistent after the first epoch). First epoch and the
   median of the later epochs.
3. **Reading batches** from the memory-mapped cache: inline, through the prefetch thread, and through
   ``DataLoader`` worker processes over a batch sampler (each batch one gather), with the same crop.

    python benchmarks/data/bench_pipeline.py [--images 6000] [--sizes 64,96] [--workers 2] [--repeats 3]
                                             [--out benchmarks/data/results.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from selfsup.data.cache import CacheOptions, decode_all, open_cache, prepare_folder
from selfsup.data.imageset import ImageSet
from selfsup.data.stream import prefetch_batches
from selfsup.views.ops import resized_crop_flip

SCALE, RATIO, BATCH = (0.08, 1.0), (3 / 4, 4 / 3), 256


def make_folder(root: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs in 10 class folders: random crops of the two sample photos, resized."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    paths = []
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo = photos[i % 2]
        aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))
        h = int(rng.integers(120, 400))
        w = min(photo.width, int(h * aspect))
        left, top = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        longer = int(rng.integers(160, 257))
        scale = longer / max(w, h)
        crop = photo.crop((left, top, left + w, top + h)).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                                 Image.BICUBIC)
        path = root / f"class{i % 10}" / f"{i:05d}.jpg"
        crop.save(path, quality=90)
        paths.append(path)
    return paths


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def our_epoch(images: ImageSet, size: int, seed: int, reader: str = "prefetch", workers: int = 2) -> float:
    """One epoch: batches read from the cache → aspect-aware random-resized crop + flip → float."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).split(BATCH)
    t0 = time.perf_counter()
    if reader == "inline":
        batches = ((idx, images.batch(idx), images.aspect[idx]) for idx in order)
    elif reader == "prefetch":
        batches = prefetch_batches(images, order, depth=2)
    else:  # DataLoader workers over a batch sampler: each item is one gather of a whole batch
        batches = iter(torch.utils.data.DataLoader(_Batches(images, order), batch_size=None, num_workers=workers,
                                                   prefetch_factor=2))
    for _, x, aspect in batches:
        out = resized_crop_flip(x.float().div_(255), size, SCALE, RATIO, 0.5, aspect)
    assert out.dtype == torch.float32 and out.shape[-1] == size
    return time.perf_counter() - t0


class _Batches(torch.utils.data.Dataset):
    def __init__(self, images: ImageSet, order: list[torch.Tensor]):
        self.images, self.order = images, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        idx = self.order[i]
        return idx, self.images.batch(idx), self.images.aspect[idx]


def evict(path: Path) -> None:
    """Drop a file's pages from the OS page cache (only this file's; nothing may have it mapped)."""
    gc.collect()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        for _ in range(2):  # the second call catches pages still queued on per-CPU lists during the first
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def torchvision_loader(root: Path, size: int, workers: int):
    from torchvision import datasets, transforms

    t = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                            transforms.ToTensor()])
    return torch.utils.data.DataLoader(datasets.ImageFolder(str(root), transform=t), batch_size=BATCH, shuffle=True,
                                       num_workers=workers, persistent_workers=True)


def tv_epoch(loader) -> float:
    t0 = time.perf_counter()
    for x, _ in loader:
        pass
    assert x.dtype == torch.float32
    return time.perf_counter() - t0


def cpu_kind() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "?")
    return f"{name}, {'AVX-512 bf16' if 'avx512_bf16' in text else 'no AVX-512 bf16'}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--decode-images", type=int, default=2000)
    ap.add_argument("--sizes", default="64,96")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for selfsup's augmentation (its batch "
                    "reads run in one more thread)")
    ap.add_argument("--out", help="write the figures as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    med = statistics.median
    tmp = Path(tempfile.mkdtemp(prefix="selfsup_bench_pipeline_"))
    result = {"date": str(date.today()), "cpu": cpu_kind(), "torch": torch.__version__, "images": args.images,
              "workers": args.workers, "threads": args.threads, "batch": BATCH, "repeats": args.repeats,
              "load_average_before": os.getloadavg()[0]}
    try:
        t0 = time.perf_counter()
        paths = make_folder(tmp / "images", args.images)
        print(f"made {len(paths)} JPEGs in {time.perf_counter() - t0:.1f} s "
              f"({sum(p.stat().st_size for p in paths) / 2**20:.0f} MiB); CPU: {result['cpu']}", flush=True)

        # 1. decoding: process pool vs thread pool (the files already in the page cache)
        some = [str(p) for p in paths[: args.decode_images]]
        for p in some:
            Path(p).read_bytes()
        stored = CacheOptions(sizes[0]).size
        decode = {"process": [], "thread": [], "one process": []}
        for _ in range(args.repeats):
            decode["process"].append(timed(lambda: list(decode_all(some, stored, args.workers, "process"))))
            decode["thread"].append(timed(lambda: list(decode_all(some, stored, args.workers, "thread"))))
            decode["one process"].append(timed(lambda: list(decode_all(some, stored, 1))))
        result["decode"] = {k: {"seconds": med(v), "images_per_s": len(some) / med(v)} for k, v in decode.items()}
        print(f"decode {len(some)} JPEGs → {stored}px records: " + ", ".join(
            f"{k} {len(some) / med(v):.0f} img/s" for k, v in decode.items()), flush=True)

        # 2. pipeline: first epoch (our cache build + an epoch) and later epochs, side by side
        result["pipeline"] = {}
        for size in sizes:
            opts = CacheOptions(size, cache_dir=str(tmp / f"cache{size}"), workers=args.workers, progress=False)
            build = {}
            loader = torchvision_loader(tmp / "images", size, args.workers)
            tv_first = tv_epoch(loader)
            build_s = timed(lambda: build.setdefault("report", prepare_folder(tmp / "images", opts)))
            images = open_cache(build["report"], tmp / "images", size)
            ours_first = build_s + our_epoch(images, size, seed=0)
            ours, theirs = [], []
            for r in range(args.repeats):
                ours.append(our_epoch(images, size, seed=r + 1))
                theirs.append(tv_epoch(loader))
            n = len(images)
            row = {"stored_size": images.stored_size, "cache_build_s": build_s,
                   "first_epoch": {"selfsup": n / ours_first, "torchvision": n / tv_first},
                   "later_epochs": {"selfsup": n / med(ours), "torchvision": n / med(theirs)}}
            row["later_ratio"] = row["later_epochs"]["selfsup"] / row["later_epochs"]["torchvision"]
            row["first_ratio"] = row["first_epoch"]["selfsup"] / row["first_epoch"]["torchvision"]
            result["pipeline"][size] = row
            del loader
            print(f"{size}px (cache {images.stored_size}px): first epoch selfsup {n / ours_first:.0f} img/s "
                  f"(build {build_s:.1f} s) vs torchvision {n / tv_first:.0f} ({row['first_ratio']:.2f}×); "
                  f"later epochs {n / med(ours):.0f} vs {n / med(theirs):.0f} img/s ({row['later_ratio']:.2f}×)",
                  flush=True)

        # 3. reading batches from the memory map: inline, prefetch thread, DataLoader workers; with the shard in
        # the page cache (warm) and evicted from it before each epoch (cold: what a set larger than RAM sees)
        size = sizes[0]
        opts = CacheOptions(size, cache_dir=str(tmp / f"cache{size}"), progress=False)
        report = prepare_folder(tmp / "images", opts)
        result["readers"] = {}
        for cache_state in ("warm", "cold"):
            readers = {"inline": [], "prefetch": [], "dataloader": []}
            for r in range(args.repeats):
                for k in readers:
                    if cache_state == "cold":
                        evict(report.path / report.manifest.shard)
                    images = open_cache(report, tmp / "images", size)  # a fresh mapping
                    readers[k].append(our_epoch(images, size, seed=100 + r, reader=k, workers=args.workers))
                    del images
                    gc.collect()
            result["readers"][cache_state] = {k: len(paths) / med(v) for k, v in readers.items()}
            print(f"reading + {size}px crop, {cache_state} page cache: " + ", ".join(
                f"{k} {v:.0f} img/s" for k, v in result["readers"][cache_state].items()), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["load_average_after"] = os.getloadavg()[0]
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
