"""Building an image-folder cache: decode in parallel, write records, publish atomically.

Records are appended in path order to a staging file inside a temporary directory
(``.tmp-<name>-<key>-<pid>-<random>``) next to the cache; the manifest is written last; then the
directory is renamed into place. A kill or a full disk at any point leaves only the temporary
directory, which no reader looks at and the next build (holding the cache's lock) removes.
Decoding runs in a process pool (PIL's decode and resize hold the GIL for part of their work;
benchmarks/data/README.md compares the two), fed a few chunks at a time so memory stays bounded
for any number of files; files unchanged since the previous build are copied, not decoded.

What a file becomes is a :class:`RecordSource`: :data:`IMAGES` (one record per image) unless a caller passes
another. Its hook for files that give several records each (a video's clips, :mod:`selfsup.data.video_folder`)
has the decoder write them to a file of its own in the build's temporary directory and return it as
:class:`Spilled`, which is appended to the shard: however long the video, a worker holds one record at a time.
"""
from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import secrets
import shutil
import time
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
from tqdm import tqdm

from selfsup.data.decode import DECODER_VERSION, Decoded, Unreadable, decode_image
from selfsup.data.folder import FolderListing, list_folder
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


@dataclass(frozen=True)
class Spilled:
    """Records a decoder wrote to a file of its own: ``count`` records staged as RGB (frames × 3 channels each),
    and the file's manifest columns (``width``, ``height``, ``aspect``, ``gray`` and the source's own)."""
    path: str
    count: int
    columns: dict[str, Any]


def _decode_image(path: str, size: int, workdir: str) -> Decoded:
    return decode_image(path, size)


@dataclass(frozen=True)
class RecordSource:
    """What a folder's files become. The default is the image cache: every image file one (C, S, S) record.
    Another source lists other files (``lister``) and decodes each into records of ``frames`` × C channels
    (``decode(path, size, workdir) -> Decoded | Spilled``, raising :class:`Unreadable`; picklable, as it runs in
    worker processes); ``columns`` name the per-file manifest columns its :class:`Spilled` results add, and
    ``settings`` what its records depend on beyond the image cache's (part of the cache key)."""
    decode: Callable[[str, int, str], Decoded | Spilled] = _decode_image
    lister: Callable[[str], FolderListing] = list_folder
    frames: int = 1
    columns: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    unit: str = "img"
    what: str = "image files"
    chunk: int = CHUNK
    pool_min: int = POOL_MIN_FILES


IMAGES = RecordSource()


def _write_records(f: BinaryIO, records: np.ndarray) -> None:
    """Append uint8 records (k, C, S, S) to the shard."""
    f.write(np.ascontiguousarray(records).data)


def _as_rgb(records: np.ndarray, frames: int) -> np.ndarray:
    """Records (k, frames × c, S, S), c = 1 or 3, as the staged (k, frames × 3, S, S)."""
    k, _, s, _ = records.shape
    return np.broadcast_to(records.reshape(k, frames, -1, s, s), (k, frames, 3, s, s)).reshape(k, frames * 3, s, s)


def _append_file(f: BinaryIO, path: str) -> None:
    with open(path, "rb") as src:
        shutil.copyfileobj(src, f, 1 << 20)
    os.unlink(path)


def _attempt(path: str, size: int, source: RecordSource = IMAGES, workdir: str = "") -> Decoded | Spilled | str:
    try:
        return source.decode(path, size, workdir)
    except Unreadable as exc:
        return str(exc)


def _attempt_many(paths: list[str], size: int, *source: Any) -> list[Decoded | Spilled | str]:
    return [_attempt(p, size, *source) for p in paths]


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


def decode_all(paths: list[str], size: int, workers: int, kind: str = "process", source: RecordSource = IMAGES,
               workdir: str = "") -> Iterator[Decoded | Spilled | str]:
    """Decoded records (or skip reasons) in the order of ``paths``. At most a few chunks per worker are
    in flight, so memory stays bounded however many files there are."""
    extra = () if source is IMAGES else (source, workdir)  # images: the two-argument call tests patch
    if workers <= 1 or len(paths) < source.pool_min:
        for p in paths:
            yield _attempt(p, size, *extra)
        return
    chunks = iter([paths[i : i + source.chunk] for i in range(0, len(paths), source.chunk)])
    with make_executor(kind, workers) as pool:
        pending = deque(pool.submit(_attempt_many, c, size, *extra) for c in islice(chunks, 4 * workers))
        try:
            while pending:
                results = pending.popleft().result()
                nxt = next(chunks, None)
                if nxt is not None:
                    pending.append(pool.submit(_attempt_many, nxt, size, *extra))
                yield from results
        finally:
            for fut in pending:
                fut.cancel()


def build_cache(target: Path, listing: FolderListing, settings: dict, previous: Manifest | None,
                workers: int | None = None, progress: bool = True,
                source: RecordSource = IMAGES) -> tuple[Manifest, int, int]:
    """Write a new cache into a temporary directory and rename it into place; (manifest, decoded, reused)."""
    t0 = time.perf_counter()
    size, n, frames = int(settings["size"]), len(listing.files), source.frames
    labels, classes = listing.labels()
    old_records, reuse = _reusable(target, listing, previous)
    todo = [str(listing.root / listing.files[i]) for i in range(n) if i not in reuse]
    workers = workers or default_workers()
    need = n * 3 * frames * size * size  # staged as RGB: an upper bound for images (a video may give more records)
    free = shutil.disk_usage(target.parent).free
    if need > free:
        raise DataError(_no_space(target, need, free))
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    cols: dict[str, list] = {"path": listing.files, "size": listing.sizes, "mtime_ns": listing.mtimes,
                             "label": labels if labels is not None else [None] * n, "width": [], "height": [],
                             "aspect": [], "gray": [], "index": [], "skip": []}
    per_file = ("width", "height", "aspect", "gray", *source.columns)
    several = source is not IMAGES  # a "records" column: how many records each file gave
    cols.update({c: [] for c in (("records",) if several else ()) + source.columns})
    count = 0
    try:
        staging = tmp / "staging.u8"
        bar = tqdm(total=n, desc=f"caching {listing.root.name} ({size}px)", unit=source.unit,
                   disable=not progress, smoothing=0.05)
        with open(staging, "wb") as f, bar, \
                closing(decode_all(todo, size, workers, source=source, workdir=str(tmp))) as results:
            for i in range(n):
                if i in reuse:  # unchanged since the last build: its records (or its skip reason) are copied
                    j = reuse[i]
                    values = {c: previous.files[c][j] for c in per_file}
                    k, skip, got_records = previous.files["index"][j], previous.files["skip"][j], previous.records(j)
                    if got_records:
                        _write_records(f, _as_rgb(old_records[k : k + got_records], frames))
                else:
                    got = next(results)
                    got_records, skip, values = 0, None, dict.fromkeys(per_file)
                    if isinstance(got, str):
                        skip = got
                    elif isinstance(got, Spilled):
                        got_records, values = got.count, {c: got.columns.get(c) for c in per_file}
                        _append_file(f, got.path)
                    else:
                        got_records = 1
                        values.update(width=got.width, height=got.height, aspect=round(got.aspect, 6), gray=got.gray)
                        _write_records(f, _as_rgb(got.pixels.transpose(2, 0, 1)[None], 1))
                values.update(index=count if got_records else -1, skip=skip)
                if several:
                    values["records"] = got_records
                for key, value in values.items():
                    cols[key].append(value)
                count += got_records
                bar.update()
            f.flush()
            os.fsync(f.fileno())
        if count == 0:
            raise DataError(f"{listing.root}: none of its {n} {source.what} could be read; first: "
                            f"{listing.files[0]}: {cols['skip'][0]}")
        channels = 1 if all(g for g in cols["gray"] if g is not None) else 3
        _finish_shard(staging, tmp / SHARD, count, channels, size, frames)
        manifest = Manifest(str(listing.root), settings, channels * frames, count, classes, labels is not None,
                            listing.dirs, cols, listing.problems,
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


def _finish_shard(staging: Path, shard: Path, count: int, channels: int, size: int, frames: int = 1) -> None:
    """Records are staged as RGB (whether all are gray is known only at the end); a gray folder is
    compacted to one channel (per frame)."""
    if channels == 3:
        os.rename(staging, shard)
        return
    rgb = np.memmap(staging, dtype=np.uint8, mode="r", shape=(count, frames, 3, size, size))
    step = max(1, (64 << 20) // (3 * frames * size * size))
    with open(shard, "wb") as f:
        for start in range(0, count, step):
            _write_records(f, rgb[start : start + step, :, :1])
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


@contextmanager
def staged_build(target: Path, what: str) -> Iterator[Path]:
    """A fresh staging folder beside ``target`` for a cache being built; ``publish_staged`` puts it in place. On any
    error the folder is removed, and an ``OSError`` (a full or read-only disk) becomes one :class:`DataError` naming
    ``what`` and where to point the cache instead."""
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"could not write the {what} {target}: {exc}; point data.cache_dir (or "
                        "$SELFSUP_CACHE) at a writable disk with room") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_staged(tmp: Path, target: Path, manifest: dict[str, Any], started: float) -> None:
    """Write ``manifest`` (with the build's seconds and time) durably into the staging folder, then publish it."""
    manifest = {**manifest, "build": {"seconds": round(time.perf_counter() - started, 3),
                                      "created": datetime.now(timezone.utc).isoformat(timespec="microseconds")}}
    with open(tmp / "manifest.json", "w") as mf:
        json.dump(manifest, mf, separators=(",", ":"))
        mf.flush()
        os.fsync(mf.fileno())
    _publish(tmp, target)


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
