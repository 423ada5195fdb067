"""Image folders decoded once into an on-disk cache, then read lazily through a memory map.

Where: ``$SELFSUP_CACHE``, else ``$XDG_CACHE_HOME/selfsup``, else ``~/.cache/selfsup`` (``data.cache_dir``
overrides), in ``<name>-<key>/`` where the key hashes the folder's absolute path and the build
settings. A user cache directory, not one inside the folder, so read-only folders work and one
folder can have caches for several image sizes side by side; on a shared filesystem every node
of a multi-node run finds the same cache under the same key.

Stored side: S = round(image_size × 4/3) (``data.cache_size`` overrides). A random-resized crop with
the usual scale (0.08, 1) covers a median √0.54 ≈ 0.73 of the image side, so at S = 4/3 × size the
median crop is resampled at about its stored resolution instead of being enlarged; and the
centre square of a 4:3 photo, what evaluation looks at, keeps exactly ``image_size`` pixels per side
(ImageNet's 8/7 would enlarge it by 1.17×). Records cost 1.78× the pixels of the bare image size.

Building (:func:`prepare_folder`, :mod:`selfsup.data.build`) lists the folder, decodes images in a
process pool (one record per image, :mod:`selfsup.data.decode`), writes them into a temporary
directory and renames it into place only when complete, so a kill or a full disk never leaves a
cache that is used; leftovers are removed by the next build. One build per cache at a time (an ``flock`` on ``<name>-<key>.lock``):
concurrent processes wait and then use what the first one built. A cache is checked on every use:
format and settings, the shard's size (a truncated shard is rebuilt with a warning), and the
folder — ``fast`` (default): a stat per directory, which sees files added, removed or renamed;
``full`` (``data.cache_check=full``, ``selfsup prepare --verify``): a stat per file, which also sees
files rewritten in place. A changed folder updates the cache: unchanged images are copied from
the old records, only new or modified files are decoded. Skipped files that this process may now read are
retried once: an older decoder's decode errors (``selfsup.data.decode.DECODER_VERSION``), HEIC files skipped before
pi-heif was installed.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from selfsup.data.build import IMAGES, RecordSource, build_cache, remove_leftovers
from selfsup.data.decode import MAX_ASPECT, RESIZE_GAP
from selfsup.data.folder import IMAGE_SUFFIXES, FolderChanges, FolderListing, directory_changes, file_changes
from selfsup.data.imageset import DataError, ImageSet
from selfsup.data.manifest import CacheDamaged, Manifest
from selfsup.data.shard import RecordFile

log = logging.getLogger(__name__)
ENV_VAR = "SELFSUP_CACHE"
CACHE_SIZE_RATIO = 4 / 3
CHECKS = ("fast", "full")
MAX_BROKEN_FRACTION = 0.5
"""A folder where more than half the files are unreadable stops with a summary instead of training."""


@dataclass(frozen=True)
class CacheOptions:
    image_size: int = 64
    """Side of the views trained on; the stored side S is derived from it."""
    cache_size: int | None = None
    """Stored side S; ``None`` is round(image_size × 4/3)."""
    cache_dir: str | None = None
    check: str = "fast"
    workers: int | None = None
    """Decoding processes; ``None`` uses every core this process may run on."""
    progress: bool = True

    @property
    def size(self) -> int:
        return self.cache_size or max(self.image_size, round(self.image_size * CACHE_SIZE_RATIO))

    def settings(self) -> dict:
        """What the records depend on (part of the key; checked against the manifest)."""
        return {"size": self.size, "resize": "squash", "max_aspect": MAX_ASPECT, "filter": "bicubic",
                "reducing_gap": RESIZE_GAP}


@dataclass
class CacheReport:
    path: Path
    manifest: Manifest
    action: str
    """``"reused"``, ``"built"`` or ``"updated (...)"`` / ``"rebuilt (...)"`` with the reason."""
    seconds: float
    decoded: int = 0
    reused: int = 0

    def skip_reasons(self) -> Counter:
        return Counter(reason.split(":")[0] for reason in self.manifest.skipped().values())


def cache_root(cache_dir: str | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "selfsup"


def cache_settings(opts: CacheOptions, source: RecordSource = IMAGES) -> dict:
    """What the records depend on: the image cache's settings and, for another source (videos), its own."""
    return {**opts.settings(), **source.settings}


def cache_path(folder: str | Path, opts: CacheOptions, source: RecordSource = IMAGES) -> Path:
    """``<root>/<folder name>-<16 hex digits>``, the key hashing the absolute folder path and the settings."""
    absolute = str(Path(folder).resolve())
    key = hashlib.sha256(json.dumps({"folder": absolute, "settings": cache_settings(opts, source)},
                                    sort_keys=True).encode())
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(absolute).name)[:40] or "root"
    return cache_root(opts.cache_dir) / f"{name}-{key.hexdigest()[:16]}"


def load_image_folder(folder: str | Path, image_size: int = 64, *, cache_dir: str | None = None,
                      cache_size: int | None = None, check: str = "fast", workers: int | None = None,
                      progress: bool = True) -> ImageSet:
    """The folder's images as a file-backed :class:`ImageSet` (records (C, S, S) with aspect ratios),
    building or updating its cache first when needed."""
    opts = CacheOptions(image_size, cache_size, cache_dir, check, workers, progress)
    try:
        return open_cache(prepare_folder(folder, opts), folder, image_size)
    except FileNotFoundError:  # a concurrent rebuild replaced the cache between its check and its mapping
        return open_cache(prepare_folder(folder, opts), folder, image_size)


def prepare_folder(folder: str | Path, opts: CacheOptions, source: RecordSource = IMAGES) -> CacheReport:
    """A valid cache of ``folder`` for ``opts``: the existing one when it checks out, else built anew. ``source``:
    what its files become (images by default; :mod:`selfsup.data.video_folder` passes videos)."""
    t0 = time.perf_counter()
    base = Path(folder)
    if not base.is_dir():
        raise DataError(f"{'image' if source is IMAGES else 'video'} folder not found: {base}")
    if opts.check not in CHECKS:
        raise DataError(f"cache check must be one of {', '.join(CHECKS)}, got {opts.check!r}")
    if opts.size < opts.image_size:
        raise DataError(f"data.cache_size ({opts.size}) is smaller than the image size ({opts.image_size}); make it "
                        "≥ the image size or leave it unset")
    absolute, settings = str(base.resolve()), cache_settings(opts, source)
    target = cache_path(base, opts, source)
    state = _validate(target, absolute, settings, opts.check, source)
    if state.ok:
        return CacheReport(target, state.manifest, "reused", time.perf_counter() - t0)
    root = target.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the image cache folder {root} ({exc.strerror}); point data.cache_dir "
                        f"(or ${ENV_VAR}) at a writable folder") from None
    with _build_lock(target) as locked:
        state = _validate(target, absolute, settings, opts.check, source)  # another process may have built it meanwhile
        if state.ok:
            return CacheReport(target, state.manifest, "reused", time.perf_counter() - t0)
        if state.problem:
            log.warning("the cache of %s at %s cannot be used (%s); rebuilding it", base, target, state.problem)
        elif state.changes:
            log.warning("updating the cache of %s (%s): unchanged images are copied, only new, modified or retried "
                        "files are decoded", base, state.changes)
        if locked:  # without the lock a leftover may be another process's build in progress
            remove_leftovers(root, target.name)
        listing = state.listing or source.lister(absolute)
        if not listing.files:
            if source is not IMAGES:
                raise DataError(f"{base} holds no {source.what}; point it at a folder of them")
            raise DataError(f"{base} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                            "point --data at a folder of images")
        previous = state.manifest if state.changes else None  # a damaged cache's records are not trusted
        manifest, decoded, reused = build_cache(target, listing, settings, previous, opts.workers,
                                                opts.progress, source)
    action = ("built" if state.missing else f"rebuilt ({state.problem})" if state.problem
              else f"updated ({state.changes})")
    return CacheReport(target, manifest, action, time.perf_counter() - t0, decoded, reused)


def open_cache(report: CacheReport, folder: str | Path, image_size: int) -> ImageSet:
    """The file-backed :class:`ImageSet` of a prepared cache; stops when most files were unreadable."""
    m = report.manifest
    skipped = m.skipped()
    total = m.count + len(skipped)
    if skipped:
        reasons = ", ".join(f"{k}×{v}" for k, v in report.skip_reasons().items())
        first = next(iter(skipped.items()))
        log.warning("skipped %d unreadable file(s) in %s (%s); first: %s: %s; every one is listed in %s",
                    len(skipped), folder, reasons, first[0], first[1], report.path / "manifest.json")
    if m.count == 0 or len(skipped) > MAX_BROKEN_FRACTION * total:
        examples = "; ".join(f"{p}: {r}" for p, r in list(skipped.items())[:3])
        raise DataError(f"{folder}: {len(skipped)} of {total} image files are unreadable "
                        f"(more than {MAX_BROKEN_FRACTION:.0%}); examples: {examples}")
    array = np.memmap(report.path / m.shard, dtype=np.uint8, mode="c", shape=m.record_shape)
    file = RecordFile(report.path / m.shard, m.count, m.record_shape[1:])
    stored = m.record_files()  # each record's file (an image cache: one record per stored file)
    f = m.files
    labels = torch.tensor([f["label"][i] for i in stored], dtype=torch.long) if m.labelled else None
    aspect = torch.tensor([f["aspect"][i] for i in stored], dtype=torch.float32)
    paths = [str(Path(folder) / f["path"][i]) for i in stored]
    return ImageSet(torch.from_numpy(array), labels, m.classes if m.labelled else [], f"folder:{Path(folder).name}",
                    paths, len(skipped), aspect=aspect, image_size=image_size, mapped=True, source=str(report.path),
                    file=file)


# ------------------------------------------------------------------------------------------ validation


@dataclass
class _State:
    manifest: Manifest | None = None
    missing: bool = False
    problem: str | None = None
    changes: FolderChanges | None = None
    listing: FolderListing | None = None

    @property
    def ok(self) -> bool:
        return not (self.missing or self.problem or self.changes)


def _validate(target: Path, folder: str, settings: dict, check: str, source: RecordSource = IMAGES) -> _State:
    try:
        m = Manifest.read(target)
    except FileNotFoundError:
        return _State(missing=True)
    except CacheDamaged as exc:
        return _State(problem=str(exc))
    problem = m.mismatch(folder, settings)
    if problem:
        return _State(problem=problem)
    try:
        have = os.stat(target / m.shard).st_size
    except OSError:
        have = -1
    if have != m.shard_bytes:
        return _State(problem=f"the shard {m.shard} has {max(have, 0):,} bytes, not {m.shard_bytes:,}: truncated "
                              "or damaged")
    retried = len(m.retryable())
    if check == "fast" and not retried and not directory_changes(Path(folder), m.dirs):
        return _State(manifest=m)
    listing = source.lister(folder)
    changes = file_changes(m.listing(), listing)
    changes.retried = retried
    if changes:
        return _State(manifest=m, changes=changes, listing=listing)
    if listing.dirs != m.dirs:
        # only non-image entries changed: record the new directory times so the fast check passes again
        m.dirs = listing.dirs
        try:
            m.write(target)
        except OSError:
            log.debug("could not refresh the directory times in %s (read-only cache?)", target)
    return _State(manifest=m)


@contextmanager
def _build_lock(target: Path) -> Iterator[bool]:
    """Held while building ``target``; yields whether it is really locked."""
    path = target.parent / f"{target.name}.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building the cache %s", target)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as exc:  # a filesystem without locks (some FUSE mounts): builds are still atomic
            log.warning("cannot lock %s (%s): concurrent processes may each build this cache", path, exc.strerror)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
