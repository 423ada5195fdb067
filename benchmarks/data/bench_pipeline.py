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
   ``DataLoader`` worker processes over a batch sampler (each batch one gather), with the same crop; with
   the shard in the page cache and evicted from it before each epoch.
4. **Peak RSS** of a fresh process loading the folder with ``load_dataset`` and reading one epoch of
   batches: streamed from the cache, held in RAM, and (``--old-code``) the code before the cache.

    python benchmarks/data/bench_pipeline.py [--images 6000] [--sizes 64,96] [--workers 2] [--repeats 3]
                                             [--out benchmarks/data/results.json] [--old-code DIR]
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

from selfsup.data.build import decode_all
from selfsup.data.cache import CacheOptions, open_cache, prepare_folder
from selfsup.data.imageset import ImageSet
from selfsup.data.stream import prefetch_batches
from selfsup.views.ops import resized_crop_flip

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_folder import random_crop  # noqa: E402

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
        path = root / f"class{i % 10}" / f"{i:05d}.jpg"
        random_crop(photos[i % 2], rng).save(path, quality=90)
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


RSS_PROBE = """
import json, sys, torch
from selfsup.config import DataConfig
from selfsup.data import load_dataset
def status_mb(key):  # VmHWM: unlike ru_maxrss it starts afresh at exec, not at the forking parent's peak
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) / 1024
root, size, extra = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
base, anon = status_mb("VmHWM"), status_mb("RssAnon")
train, test = load_dataset(DataConfig(name=root, image_size=size, **extra))
for idx in torch.randperm(len(train)).split(256):
    x = train.batch(idx) if hasattr(train, "batch") else train.images[idx]
print(json.dumps({"imports_mb": base, "peak_mb": status_mb("VmHWM"), "anon_growth_mb": status_mb("RssAnon") - anon,
                  "file_mapped_mb": status_mb("RssFile")}))
"""


def peak_rss(tmp: Path, size: int, extra: dict, pythonpath: str | None = None) -> dict[str, float]:
    """Peak resident MB of a fresh process that loads the folder with ``load_dataset`` and reads one epoch
    of batches (the cache already built, in ``tmp/cache<size>``), and its peak after the imports alone
    (torch and selfsup take most of it)."""
    env = {**os.environ, "SELFSUP_CACHE": str(tmp / "rss_cache")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    else:
        extra = {"cache_dir": str(tmp / f"cache{size}"), **extra}
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp / "images"), str(size), json.dumps(extra)],
                         capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_kind() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "?")
    return f"{name}, {'AVX-512 bf16' if 'avx512_bf16' in text else 'no AVX-512 bf16'}"


def bench_decode(paths: list[Path], size: int, args) -> dict:
    """Decoding into records: a process pool vs a thread pool of ``args.workers``, and one process."""
    some = [str(p) for p in paths[: args.decode_images]]
    for p in some:  # in the page cache for all three
        Path(p).read_bytes()
    stored = CacheOptions(size).size
    times = {"process": [], "thread": [], "one process": []}
    for _ in range(args.repeats):
        times["process"].append(timed(lambda: list(decode_all(some, stored, args.workers, "process"))))
        times["thread"].append(timed(lambda: list(decode_all(some, stored, args.workers, "thread"))))
        times["one process"].append(timed(lambda: list(decode_all(some, stored, 1))))
    out = {k: {"seconds": statistics.median(v), "images_per_s": len(some) / statistics.median(v)}
           for k, v in times.items()}
    print(f"decode {len(some)} JPEGs → {stored}px records: " + ", ".join(
        f"{k} {v['images_per_s']:.0f} img/s" for k, v in out.items()), flush=True)
    return out


def bench_pipeline(tmp: Path, size: int, args) -> dict:
    """First epoch (our cache build + an epoch) and later epochs, selfsup and torchvision interleaved."""
    opts = CacheOptions(size, cache_dir=str(tmp / f"cache{size}"), workers=args.workers, progress=False)
    loader = torchvision_loader(tmp / "images", size, args.workers)
    tv_first = tv_epoch(loader)
    t0 = time.perf_counter()
    images = open_cache(prepare_folder(tmp / "images", opts), tmp / "images", size)
    build_s = time.perf_counter() - t0
    ours_first = build_s + our_epoch(images, size, seed=0)
    ours, theirs = [], []
    for r in range(args.repeats):
        ours.append(our_epoch(images, size, seed=r + 1))
        theirs.append(tv_epoch(loader))
    n, med = len(images), statistics.median
    row = {"stored_size": images.stored_size, "cache_build_s": build_s,
           "first_epoch": {"selfsup": n / ours_first, "torchvision": n / tv_first},
           "later_epochs": {"selfsup": n / med(ours), "torchvision": n / med(theirs)}}
    row["first_ratio"] = row["first_epoch"]["selfsup"] / row["first_epoch"]["torchvision"]
    row["later_ratio"] = row["later_epochs"]["selfsup"] / row["later_epochs"]["torchvision"]
    print(f"{size}px (cache {images.stored_size}px): first epoch selfsup {n / ours_first:.0f} img/s "
          f"(build {build_s:.1f} s) vs torchvision {n / tv_first:.0f} ({row['first_ratio']:.2f}×); "
          f"later epochs {n / med(ours):.0f} vs {n / med(theirs):.0f} img/s ({row['later_ratio']:.2f}×)", flush=True)
    return row


def bench_readers(tmp: Path, size: int, args) -> dict:
    """Reading batches from the memory map: inline, prefetch thread, DataLoader workers; with the shard in
    the page cache (warm) and evicted from it before each epoch (cold: what a set larger than RAM sees)."""
    report = prepare_folder(tmp / "images", CacheOptions(size, cache_dir=str(tmp / f"cache{size}"), progress=False))
    out = {}
    for cache_state in ("warm", "cold"):
        times = {"inline": [], "prefetch": [], "dataloader": []}
        for r in range(args.repeats):
            for k in times:
                if cache_state == "cold":
                    evict(report.path / report.manifest.shard)
                images = open_cache(report, tmp / "images", size)  # a fresh mapping
                times[k].append(our_epoch(images, size, seed=100 + r, reader=k, workers=args.workers))
                n = len(images)
                del images
                gc.collect()
        out[cache_state] = {k: n / statistics.median(v) for k, v in times.items()}
        print(f"reading + {size}px crop, {cache_state} page cache: " + ", ".join(
            f"{k} {v:.0f} img/s" for k, v in out[cache_state].items()), flush=True)
    return out


def bench_rss(tmp: Path, size: int, args) -> dict:
    """Peak RSS of fresh processes loading the folder and reading one epoch of batches."""
    prepare_folder(tmp / "images", CacheOptions(size, cache_dir=str(tmp / f"cache{size}"), progress=False))
    out = {"selfsup, cache reused, streamed": peak_rss(tmp, size, {"stream": True}),
           "selfsup, cache reused, in RAM": peak_rss(tmp, size, {"stream": False})}
    if args.old_code:
        out["before: decoded whole into RAM"] = peak_rss(tmp, size, {}, pythonpath=args.old_code)
    print("peak RSS: " + ", ".join(f"{k} {v['peak_mb']:.0f} MB ({v['peak_mb'] - v['imports_mb']:+.0f} MB over "
                                   f"the imports; anonymous memory {v['anon_growth_mb']:+.0f} MB at the end)"
                                   for k, v in out.items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--decode-images", type=int, default=2000)
    ap.add_argument("--sizes", default="64,96")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for selfsup's augmentation (its batch "
                    "reads run in one more thread)")
    ap.add_argument("--sections", default="decode,pipeline,readers,rss", help="which parts to run")
    ap.add_argument("--out", help="write the figures as JSON (sections not run keep their figures from the file)")
    ap.add_argument("--old-code", help="a checkout of selfsup before the cache (its root, put on PYTHONPATH): "
                    "also measure its peak RSS loading the same folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    sections = set(args.sections.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="selfsup_bench_pipeline_"))
    run = {"date": str(date.today()), "cpu": cpu_kind(), "torch": torch.__version__, "images": args.images,
           "workers": args.workers, "threads": args.threads, "batch": BATCH, "repeats": args.repeats,
           "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"), "load_average_before": os.getloadavg()[0]}
    result: dict = {}
    try:
        t0 = time.perf_counter()
        paths = make_folder(tmp / "images", args.images)
        print(f"made {len(paths)} JPEGs in {time.perf_counter() - t0:.1f} s "
              f"({sum(p.stat().st_size for p in paths) / 2**20:.0f} MiB); CPU: {run['cpu']}", flush=True)
        if "decode" in sections:
            result["decode"] = bench_decode(paths, sizes[0], args)
        if "pipeline" in sections:
            result["pipeline"] = {size: bench_pipeline(tmp, size, args) for size in sizes}
        if "readers" in sections:
            result["readers"] = bench_readers(tmp, sizes[0], args)
        if "rss" in sections:
            result["peak_rss_mb"] = bench_rss(tmp, sizes[0], args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    run["load_average_after"] = os.getloadavg()[0]
    if args.out:
        out = Path(args.out)
        merged = json.loads(out.read_text()) if out.is_file() else {}
        merged.setdefault("runs", {})
        for key, value in result.items():
            merged[key] = value
            merged["runs"][key] = run
        out.write_text(json.dumps(merged, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
