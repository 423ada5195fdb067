"""Building an image-folder cache: decode in parallel, write records, publish atomically.

Records are appended in path order to a staging file inside a temporary directory
(``.tmp-<name>-<key>-<pid>-<random>``) next to the cache; the manifest is written last; then the
directory is renamed into place. A kill or a full disk at any point leaves only the temporary
directory, which no reader looks at and the next build (holding the cache's lock) removes.
Decoding runs in a process pool (PIL's decode and resize hold the GIL for part of their work;
benchmarks/data/README.md compares the two), fed a few chunks at a time so memory stays bounded
for any number of files; files unchanged since the previous build are copied, not decoded.
"""
from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import secrets
import shutil
import time
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import closing
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from tqdm import tqdm

from selfsup.data.decode import DECODER_VERSION, Decoded, Unreadable, decode_image
from selfsup.data.folder import FolderListing
from selfsup.data.imageset import DataError
from selfsup.data.manifest import SHARD, Manifest

log = logging.getLogger(__name__)
POOL_MIN_FILES = 64
"""Fewer files than this are decoded in-process: starting workers would cost more than it saves."""
CHUNK = 16
"""Files per task sent to a worker: amortises inter-process traffic, keeps the progress bar moving."""


def remove_leftovers(root: Path, name: str) -> None:
    """Temporary and replaced directories of this cache that a killed build left (we hold its lock, so
    no live build owns them)."""
    for stale in list(root.glob(f".tmp-{name}-*")) + list(root.glob(f".old-{name}-*")):
        log.info("removing %s, left by an interrupted cache build", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _write_records(f: BinaryIO, records: np.ndarray) -> None:
    """Append uint8 records (k, C, S, S) to the shard."""
    f.write(np.ascontiguousarray(records).data)


def _attempt(path: str, size: int) -> Decoded | str:
    try:
        return decode_image(path, size)
    except Unreadable as exc:
        return str(exc)


def _attempt_many(paths: list[str], size: int) -> list[Decoded | str]:
    return [_attempt(p, size) for p in paths]


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def make_executor(kind: str, workers: int) -> Executor:
    """``"process"`` (the default for builds: PIL's decode and resize hold the GIL for part of their
    work, see benchmarks/data/README.md) or ``"thread"``. Processes are forked where the platform
    allows: the workers run only PIL and NumPy, and start in milliseconds instead of re-importing torch."""
    if kind == "thread":
        return ThreadPoolExecutor(workers)
    methods = multiprocessing.get_all_start_methods()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork" if "fork" in methods else None))


def decode_all(paths: list[str], size: int, workers: int, kind: str = "process") -> Iterator[Decoded | str]:
    """Decoded records (or skip reasons) in the order of ``paths``. At most a few chunks per worker are
    in flight, so memory stays bounded however many files there are."""
    if workers <= 1 or len(paths) < POOL_MIN_FILES:
        for p in paths:
            yield _attempt(p, size)
        return
    chunks = iter([paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)])
    with make_executor(kind, workers) as pool:
        pending = deque(pool.submit(_attempt_many, c, size) for c in islice(chunks, 4 * workers))
        try:
            while pending:
                results = pending.popleft().result()
                nxt = next(chunks, None)
                if nxt is not None:
                    pending.append(pool.submit(_attempt_many, nxt, size))
                yield from results
        finally:
            for fut in pending:
                fut.cancel()


def build_cache(target: Path, listing: FolderListing, settings: dict, previous: Manifest | None,
                workers: int | None = None, progress: bool = True) -> tuple[Manifest, int, int]:
    """Write a new cache into a temporary directory and rename it into place; (manifest, decoded, reused)."""
    t0 = time.perf_counter()
    size, n = int(settings["size"]), len(listing.files)
    labels, classes = listing.labels()
    old_records, reuse = _reusable(target, listing, previous)
    todo = [str(listing.root / listing.files[i]) for i in range(n) if i not in reuse]
    workers = workers or default_workers()
    need = n * 3 * size * size  # staged as RGB: an upper bound (skipped files and gray folders take less)
    free = shutil.disk_usage(target.parent).free
    if need > free:
        raise DataError(_no_space(target, need, free))
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    cols: dict[str, list] = {"path": listing.files, "size": listing.sizes, "mtime_ns": listing.mtimes,
                             "label": labels if labels is not None else [None] * n, "width": [], "height": [],
                             "aspect": [], "gray": [], "index": [], "skip": []}
    count = 0
    try:
        staging = tmp / "staging.u8"
        bar = tqdm(total=n, desc=f"caching {listing.root.name} ({size}px)", unit="img", disable=not progress,
                   smoothing=0.05)
        with open(staging, "wb") as f, bar, closing(decode_all(todo, size, workers)) as results:
            for i in range(n):
                if i in reuse:  # unchanged since the last build: its record (or its skip reason) is copied
                    j = reuse[i]
                    w, h, aspect, gray, k, skip = (previous.files[c][j] for c in
                                                   ("width", "height", "aspect", "gray", "index", "skip"))
                    rec = old_records[k] if k >= 0 else None
                else:
                    got = next(results)
                    if isinstance(got, str):
                        rec, w, h, aspect, gray, skip = None, None, None, None, None, got
                    else:
                        rec, w, h, aspect, gray, skip = (got.pixels.transpose(2, 0, 1), got.width, got.height,
                                                         round(got.aspect, 6), got.gray, None)
                if rec is not None:
                    _write_records(f, np.broadcast_to(rec, (3, size, size))[None])
                for key, value in (("width", w), ("height", h), ("aspect", aspect), ("gray", gray),
                                   ("index", count if rec is not None else -1), ("skip", skip)):
                    cols[key].append(value)
                count += rec is not None
                bar.update()
            f.flush()
            os.fsync(f.fileno())
        if count == 0:
            raise DataError(f"{listing.root}: none of its {n} image files could be read; first: "
                            f"{listing.files[0]}: {cols['skip'][0]}")
        channels = 1 if all(g for g in cols["gray"] if g is not None) else 3
        _finish_shard(staging, tmp / SHARD, count, channels, size)
        manifest = Manifest(str(listing.root), settings, channels, count, classes, labels is not None, listing.dirs,
                            cols, listing.problems,
                            {"seconds": round(time.perf_counter() - t0, 3), "decoded": len(todo), "reused": len(reuse),
                             "workers": workers, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "decoder": DECODER_VERSION})
        manifest.write(tmp)
        _fsync_dir(tmp)
        _publish(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(_no_space(target, need, None)) from None
        raise DataError(f"could not write the image cache {target}: {exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest, len(todo), len(reuse)


def _no_space(target: Path, need: int, free: int | None) -> str:
    have = f", {free / 2**30:.2f} GiB free" if free is not None else ""
    return (f"no space left to build the image cache in {target.parent} (it needs up to {need / 2**30:.2f} GiB "
            f"while building{have}); free space or point data.cache_dir (or $SELFSUP_CACHE) at a disk with room")


def _reusable(target: Path, listing: FolderListing, previous: Manifest | None) -> tuple[np.ndarray | None, dict]:
    """The old records and, for each file unchanged since (same path, size and mtime), its old position in
    the manifest (a file that was unreadable then is not decoded again either, unless an older decoder failed
    on it: :meth:`~selfsup.data.manifest.Manifest.retryable`)."""
    if previous is None:
        return None, {}
    old = {p: j for j, p in enumerate(previous.files["path"])}
    retry = previous.retryable()
    reuse = {}
    for i, (p, s, m) in enumerate(zip(listing.files, listing.sizes, listing.mtimes)):
        j = old.get(p)
        if j is not None and j not in retry and previous.files["size"][j] == s and previous.files["mtime_ns"][j] == m:
            reuse[i] = j
    records = np.memmap(target / previous.shard, dtype=np.uint8, mode="r", shape=previous.record_shape) \
        if reuse and previous.count else None
    return records, reuse


def _finish_shard(staging: Path, shard: Path, count: int, channels: int, size: int) -> None:
    """Records are staged as RGB (whether all are gray is known only at the end); a gray folder is
    compacted to one channel."""
    if channels == 3:
        os.rename(staging, shard)
        return
    rgb = np.memmap(staging, dtype=np.uint8, mode="r", shape=(count, 3, size, size))
    step = max(1, (64 << 20) // (3 * size * size))
    with open(shard, "wb") as f:
        for start in range(0, count, step):
            _write_records(f, rgb[start : start + step, :1])
        f.flush()
        os.fsync(f.fileno())
    del rgb
    staging.unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished build into place. An older cache is first renamed aside (a directory cannot
    be renamed over a non-empty one), then deleted; processes that have it mapped keep reading it."""
    old = None
    if target.exists():
        old = target.parent / f".old-{target.name}-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(target, old)
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
