"""Peak resident memory of ``selfsup pretrain`` over image folders of growing size: streamed vs held in RAM.

Makes a synthetic folder of JPEGs (:mod:`synthetic_folder`: crops of scikit-learn's two sample photos,
160–256 px on the longer side, 10 class folders) with the largest number of images asked for, and
hard-links its first N images into one folder per smaller size. For each folder:

1. ``selfsup prepare FOLDER --image-size S`` in its own process: the cache build's wall and CPU time.
2. ``selfsup pretrain`` for one epoch in its own process, once with ``--set data.stream=true`` (records
   read from the cache file batch by batch) and once with ``--set data.stream=false`` (records loaded into
   RAM), with a cheap recipe so a 200k-image epoch is affordable: SimCLR, the small CNN with widths
   16/32/64 and a stride-2 stem at 64 px, batch 256, no online kNN monitor. Each process's peak RSS is
   ``ru_maxrss`` from ``wait4`` (this parent imports no torch, so its own size at the fork, ~40 MB, is
   below any child's peak); RssAnon (the process's own memory) and RssFile (file pages mapped into it)
   are polled from ``/proc/PID/status`` every 0.2 s. Images/s and the epoch time come from the run's
   ``metrics.jsonl``, the time to the first step from its ``env.json``.

The folders are deleted after (``--root DIR --keep`` keeps them and their caches for another run).

    python benchmarks/data/bench_rss.py [--images 10000,50000,200000] [--image-size 64] [--threads 2]
                                        [--modes stream,memory] [--root DIR --keep] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_folder import link_subset, make_folder  # noqa: E402

PRETRAIN = ["--method", "simclr", "--backbone", "small_resnet", "--set", "backbone.params.widths=[16,32,64]",
            "--set", "backbone.params.stem_stride=2", "--epochs", "1", "--batch-size", "256", "--no-progress",
            "--set", "train.knn_every=0", "--set", "train.log_every=50", "--overwrite"]


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def measured(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``; its wall and CPU seconds, peak RSS (ru_maxrss) and polled peaks of RssAnon / RssFile (MB),
    exit status and the last lines of its output."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for k, v in _status_kb(proc.pid).items():
                if k in peaks:
                    peaks[k] = max(peaks[k], v)
            done.wait(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.seek(0)
    tail = log.read().splitlines()[-6:]
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "peak_anon_mb": round(peaks["RssAnon"] / 1024, 1), "peak_file_mb": round(peaks["RssFile"] / 1024, 1),
            "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2), "tail": tail}


def run_folder(folder: Path, n: int, args, env: dict[str, str], runs: Path) -> dict:
    py = [sys.executable, "-m", "selfsup"]
    prep = measured(py + ["prepare", str(folder), "--image-size", str(args.image_size), "--no-progress"], env)
    print(f"{n:>7} images: prepare {prep['wall_s']:.1f} s wall, {prep['cpu_s']:.1f} CPU s (+ its decoding workers), "
          f"peak RSS {prep['peak_rss_mb']:.0f} MB, load {prep['load_before']:.1f}", flush=True)
    row = {"images": n, "prepare": prep}
    for mode in args.modes.split(","):
        out = runs / f"{n}_{mode}"
        cmd = py + ["pretrain", "--data", str(folder), "--out", str(out), "--threads", str(args.threads),
                    "--set", f"data.image_size={args.image_size}",
                    "--set", f"data.stream={'true' if mode == 'stream' else 'false'}"] + PRETRAIN
        res = measured(cmd, env)
        if res["rc"] == 0:
            epoch = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if "epoch_time_s" in ln][-1]
            env_json = json.loads((out / "env.json").read_text())
            res.update(images_per_s=round(epoch["images_per_s"], 1), epoch_time_s=round(epoch["epoch_time_s"], 1),
                       pretraining_images=env_json["pretraining_images"], startup=env_json.get("startup"))
        row[mode] = res
        print(f"{n:>7} images, {mode:>6}: rc {res['rc']}, peak RSS {res['peak_rss_mb']:.0f} MB (anon "
              f"{res['peak_anon_mb']:.0f}, file {res['peak_file_mb']:.0f}), {res.get('images_per_s', 0):.0f} img/s, "
              f"{res['wall_s']:.0f} s wall, load {res['load_before']:.1f}–{res['load_after']:.1f}"
              + ("" if res["rc"] == 0 else "\n" + "\n".join(res["tail"])), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default="10000,50000,200000")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="stream,memory")
    ap.add_argument("--workers", type=int, default=2, help="processes making the JPEGs")
    ap.add_argument("--root", help="where the folders, caches and runs go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the folders and caches under --root")
    ap.add_argument("--out", help="write the figures as JSON")
    args = ap.parse_args(argv)
    sizes = sorted(int(s) for s in args.images.split(","))
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="selfsup_bench_rss_"))
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SELFSUP_CACHE": str(root / "cache"), "PYTHONUNBUFFERED": "1"}
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    result = {"date": str(date.today()), "cpu_bf16": "avx512_bf16" in cpu, "image_size": args.image_size,
              "threads": args.threads, "recipe": PRETRAIN, "rows": []}
    try:
        biggest = root / f"synth_{sizes[-1]}"
        seconds = make_folder(biggest, sizes[-1], args.workers)
        print(f"{sizes[-1]} JPEGs in {biggest} ({seconds:.0f} s to make)", flush=True)
        for n in sizes:
            folder = biggest if n == sizes[-1] else root / f"synth_{n}"
            if folder != biggest:
                link_subset(biggest, folder, n)
            result["rows"].append(run_folder(folder, n, args, env, root / "runs"))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
