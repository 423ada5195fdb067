"""A multi-process ``selfsup pretrain`` on the on-disk path: did it run, how fast, and did each rank read its share?

Launches ``torchrun --standalone --nproc_per_node N`` on this script in worker mode, which runs
``selfsup pretrain ARGS`` in each process with :meth:`ImageSet.batch` wrapped to note the positions the
training reader (the prefetch thread of a file-backed set) asks for. Each rank writes what it read and its
peak RSS to ``OUT/read_rank<R>.json``; the launcher then checks the ranks' sets are disjoint and together
are the images the epochs' steps cover, and reads steps and images/s from the run's ``metrics.jsonl``.

    python benchmarks/data/bench_torchrun.py --nproc 2 --out-json FILE.json -- \\
        --data DIR --set data.stream=true --epochs 1 --limit 2048 --threads 1 --out RUN [other pretrain flags]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

READER_THREAD = "selfsup-prefetch"
REPO = Path(__file__).resolve().parents[2]  # this checkout's selfsup, not another one installed in the venv


def worker(record_dir: Path, pretrain_args: list[str]) -> int:
    """Run ``selfsup pretrain`` in this process, noting the training reader's positions."""
    sys.path.insert(0, str(REPO))
    from selfsup.cli import main
    from selfsup.data.imageset import ImageSet

    read: list[int] = []
    original = ImageSet.batch

    def noting_batch(self, idx):
        if threading.current_thread().name == READER_THREAD:
            read.extend(int(i) for i in idx)
        return original(self, idx)

    ImageSet.batch = noting_batch
    rc = main(["pretrain", *pretrain_args])
    rank = int(os.environ.get("RANK", 0))
    (record_dir / f"read_rank{rank}.json").write_text(json.dumps({
        "rank": rank, "rc": rc, "positions": read,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
    return rc


def summarise(record_dir: Path, run_dir: Path, nproc: int) -> dict:
    ranks = [json.loads((record_dir / f"read_rank{r}.json").read_text()) for r in range(nproc)]
    sets = [set(r["positions"]) for r in ranks]
    overlap = sum(len(a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "epoch_time_s" in r]
    env = json.loads((run_dir / "env.json").read_text())
    return {
        "world_size": env.get("world_size"), "pretraining_images": env.get("pretraining_images"),
        "epochs": [{k: e[k] for k in ("epoch", "step", "images_per_s", "epoch_time_s", "loss") if k in e}
                   for e in epochs],
        "startup": env.get("startup"),
        "ranks": [{"rank": r["rank"], "rc": r["rc"], "images_read": len(r["positions"]),
                   "distinct": len(s), "peak_rss_mb": r["peak_rss_mb"]} for r, s in zip(ranks, sets)],
        "overlap_between_ranks": overlap, "union": len(set().union(*sets)),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, pretrain_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--worker", metavar="DIR", help="(internal) run one rank, writing its record into DIR")
    ap.add_argument("--out-json", help="write the summary as JSON")
    args = ap.parse_args(own)
    if args.worker:
        return worker(Path(args.worker), pretrain_args)
    if "--out" not in pretrain_args:
        ap.error("pass the run directory after --: -- --out RUN ...")
    run_dir = Path(pretrain_args[pretrain_args.index("--out") + 1])
    record_dir = run_dir.with_name(run_dir.name + "_reads")
    record_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           __file__, "--worker", str(record_dir), "--", *pretrain_args]
    load = os.getloadavg()
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        print(f"torchrun exited with {done.returncode}", file=sys.stderr)
        return done.returncode
    result = {"command": ["torchrun", "--standalone", "--nproc_per_node", str(args.nproc), "-m", "selfsup",
                          "pretrain", *pretrain_args],
              "wall_s": round(wall, 1), "load_before": [round(x, 2) for x in load],
              "load_after": [round(x, 2) for x in os.getloadavg()], **summarise(record_dir, run_dir, args.nproc)}
    print(json.dumps(result, indent=2))
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
