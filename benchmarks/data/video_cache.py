"""Video folders: clip reading from the cache against decoding the same files every epoch, and peak RSS of a
streamed pretraining run from 1k to 10k videos (issue #31).

Makes ``--videos`` synthetic mp4 files (MPEG-4 part 2, 96×72, ``--seconds`` s at 8 fps: a bright square moving
over a gradient, 2 class folders) with PyAV in a temporary directory.

1. **Cache vs decode** on the first ``--throughput-videos`` of them: the cache is built once (``selfsup prepare``'s
   path: records of 16 frames at 8 fps, stored at 43 px for 32 px views); then, ``--repeats`` times with the two
   interleaved, one thread each, every video's records are delivered as the training clips of the cheapest clip
   recipe (``center_clip``: 8 frames, stride 2, 32 px): (a) read from the cache file (``ClipSet.batch``, batches of
   32), (b) decoded from the file with PyAV (:func:`~selfsup.data.video_decode.decode_clip`, the same resampling and
   swscale resize the cache build does). Same clips (asserted equal), clips/s as the median over repeats.
2. **Peak RSS**: for each of ``--rss-videos`` (hard links to the first N files), ``selfsup prepare`` and then one
   epoch of ``selfsup pretrain`` (arrow_of_time, small_r3d 8-16-32, 32 px, batch 64, ``data.stream=true``), each in
   its own process; peak RSS is ``ru_maxrss`` from ``wait4`` (``bench_rss.measured``).

    python benchmarks/data/video_cache.py [--videos 10000] [--throughput-videos 300] [--repeats 3]
                                          [--rss-videos 1000,10000] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from multiprocessing import Pool
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402

from bench_rss import measured  # noqa: E402

W, H, FPS, FRAMES, IMAGE_SIZE = 96, 72, 8, 16, 32
CLIP_LEN, STRIDE, BATCH = 8, 2, 32


def make_video(job: tuple[str, int, int]) -> None:
    import av

    path, seed, frames = job
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    background = np.stack([xx * 255 // (W - 1), yy * 255 // (H - 1), np.full_like(xx, 80)], -1).astype(np.uint8)
    x0, y0 = rng.integers(0, W - 20), rng.integers(0, H - 20)
    dx = (1 if "right" in path else -1) * int(rng.integers(2, 5))
    with av.open(path, "w") as out:
        stream = out.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for t in range(frames):
            img = background.copy()
            x, y = (x0 + dx * t) % (W - 20), y0
            img[y : y + 20, x : x + 20] = (255, 230, 40)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())


def make_folder(root: Path, n: int, seconds: float, workers: int) -> float:
    t0 = time.perf_counter()
    jobs = []
    for i in range(n):
        label = ("left", "right")[i % 2]
        (root / label).mkdir(parents=True, exist_ok=True)
        jobs.append((str(root / label / f"v{i:06d}.mp4"), i, int(seconds * FPS)))
    with Pool(workers) as pool:
        pool.map(make_video, jobs, chunksize=64)
    return time.perf_counter() - t0


def link_first(src: Path, dst: Path, n: int) -> None:
    files = sorted(src.rglob("*.mp4"), key=lambda p: p.name)[:n]
    for f in files:
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, target)


def throughput(folder: Path, cache_dir: Path, repeats: int) -> dict:
    import torch

    from selfsup.data.video_decode import decode_clip, read_spilled
    from selfsup.data.video_folder import load_video_clips
    from selfsup.views.clips import center_clip

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    clips = load_video_clips(folder, IMAGE_SIZE, {"frames": FRAMES, "fps": FPS}, cache_dir=str(cache_dir))
    build_s = time.perf_counter() - t0
    size, channels = clips.stored_size, clips.channels
    paths = sorted(set(clips.paths), key=clips.paths.index)

    def from_cache() -> torch.Tensor:
        out = []
        for i in range(0, len(clips), BATCH):
            idx = torch.arange(i, min(i + BATCH, len(clips)))
            out.append(center_clip(clips.batch(idx), clips.aspect_at(idx), IMAGE_SIZE, CLIP_LEN, STRIDE, channels))
        return torch.cat(out)

    def from_files(work: str) -> torch.Tensor:
        out = []
        for p in paths:
            spilled = decode_clip(p, size, work, frames=FRAMES, fps=float(FPS))
            records = torch.from_numpy(read_spilled(spilled, FRAMES, size))
            aspect = torch.full((spilled.count,), spilled.columns["aspect"])
            out.append(center_clip(records, aspect, IMAGE_SIZE, CLIP_LEN, STRIDE, channels))
        return torch.cat(out)

    rates: dict[str, list[float]] = {"cache": [], "decode": []}
    with tempfile.TemporaryDirectory() as work:
        for r in range(repeats):
            for name in (("cache", "decode") if r % 2 == 0 else ("decode", "cache")):
                t0 = time.perf_counter()
                got = from_cache() if name == "cache" else from_files(work)
                rates[name].append(len(got) / (time.perf_counter() - t0))
                if name == "cache":
                    cached = got
                else:
                    decoded = got
        assert torch.equal(cached, decoded), "the cache and the decoder gave different clips"
    cache, decode = statistics.median(rates["cache"]), statistics.median(rates["decode"])
    return {"videos": len(paths), "clips": len(clips), "cache_build_s": round(build_s, 2),
            "cache_clips_per_s": round(cache, 1), "decode_clips_per_s": round(decode, 1),
            "ratio": round(cache / decode, 2), "repeats": {k: [round(v, 1) for v in vs] for k, vs in rates.items()}}


def rss_row(folder: Path, n: int, env: dict, runs: Path, threads: int) -> dict:
    py = [sys.executable, "-m", "selfsup"]
    prep = measured(py + ["prepare", str(folder), "--image-size", str(IMAGE_SIZE), "--frames", str(FRAMES),
                          "--fps", str(FPS), "--no-progress"], env)
    out = runs / f"rss_{n}"
    cmd = py + ["pretrain", "--method", "arrow_of_time", "--data", str(folder), "--out", str(out),
                "--threads", str(threads), "--epochs", "1", "--batch-size", "64", "--no-progress", "--overwrite",
                "--set", f"data.image_size={IMAGE_SIZE}", "--set", "data.stream=true",
                "--set", f"data.video.frames={FRAMES}", "--set", f"data.video.fps={FPS}",
                "--set", f"views.clip_len={CLIP_LEN}", "--set", f"views.stride={STRIDE}",
                "--set", "backbone.params.widths=[8,16,32]", "--set", "train.knn_every=0"]
    train = measured(cmd, env)
    if train["rc"] == 0:
        epoch = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if "epoch_time_s" in ln][-1]
        train["clips_per_s"] = round(epoch["images_per_s"], 1)
    shutil.rmtree(out, ignore_errors=True)
    print(f"{n:>6} videos: prepare {prep['wall_s']:.0f} s, peak RSS {prep['peak_rss_mb']:.0f} MB; pretrain rc "
          f"{train['rc']}, peak RSS {train['peak_rss_mb']:.0f} MB (anon {train['peak_anon_mb']:.0f}, file "
          f"{train['peak_file_mb']:.0f}), {train.get('clips_per_s', 0):.0f} clips/s, {train['wall_s']:.0f} s"
          + ("" if train["rc"] == 0 else "\n" + "\n".join(train["tail"])), flush=True)
    return {"videos": n, "prepare": prep, "pretrain": train}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=10000)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--throughput-videos", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-videos", default="1000,10000")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="processes writing the videos")
    ap.add_argument("--out", help="write the figures as JSON")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="selfsup_video_cache_"))
    env = {**os.environ, "SELFSUP_CACHE": str(root / "cache"), "PYTHONUNBUFFERED": "1"}
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    result: dict = {"date": str(date.today()), "cpu_bf16": "avx512_bf16" in cpu, "load_before": os.getloadavg()[0]}
    try:
        biggest = root / f"videos_{args.videos}"
        made = make_folder(biggest, args.videos, args.seconds, args.workers)
        print(f"{args.videos} videos in {made:.0f} s", flush=True)
        small = root / f"videos_{args.throughput_videos}"
        link_first(biggest, small, args.throughput_videos)
        result["throughput"] = throughput(small, root / "cache_throughput", args.repeats)
        t = result["throughput"]
        print(f"{t['clips']} clips of {t['videos']} videos: cache {t['cache_clips_per_s']:.0f} clips/s, decode "
              f"{t['decode_clips_per_s']:.0f} clips/s: {t['ratio']:.1f}x (cache built in {t['cache_build_s']:.1f} s)",
              flush=True)
        result["rss"] = []
        for n in sorted(int(s) for s in args.rss_videos.split(",")):
            folder = biggest if n == args.videos else root / f"rss_{n}"
            if folder != biggest:
                link_first(biggest, folder, n)
            result["rss"].append(rss_row(folder, n, env, root / "runs", args.threads))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["load_after"] = os.getloadavg()[0]
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
