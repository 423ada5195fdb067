"""What an image folder holds: ``root/*.png`` (unlabelled) or ``root/<class>/**/*.png`` (labelled).

:func:`list_folder` walks the folder once, recording every image file's size and modification
time and every directory's modification time, so a cache built from the listing can later tell
whether the folder changed (:func:`folder_changes`). Hidden files and directories (``.git``,
``.selfsup_cache``, macOS ``._*`` resource forks) are ignored. Directory symlinks are followed
but each real directory is visited once, so a symlink loop ends instead of hanging. The pixels
themselves are read through the cache: :func:`selfsup.data.cache.load_image_folder`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".bmp", ".dib", ".gif", ".tif", ".tiff",
                  ".webp", ".avif", ".heic", ".heif", ".jp2", ".j2k", ".ppm", ".pgm", ".pbm", ".pnm", ".tga"}
"""Photo and bitmap formats PIL reads (``.jfif``: JPEGs as some browsers save them; ``.mpo``: cameras' multi-picture
JPEGs, first picture; ``.heic``/``.heif``: phones' photos, with pi-heif; ``.avif``/``.jp2``: where PIL was built
with them; a file PIL cannot read is skipped with the reason). Other files are not listed at all."""
RACY_NS = 2 * 10**9
"""A directory modified less than 2 s before it was listed may change again within the same timestamp tick
(milliseconds locally, a second on some network filesystems); its time is recorded as unknown (-1), so
the next fast check lists it again rather than trust it (git's "racily clean" rule)."""


@dataclass
class FolderListing:
    root: Path
    """Absolute path of the folder."""
    files: list[str] = field(default_factory=list)
    """Image files relative to ``root`` (POSIX separators), sorted."""
    sizes: list[int] = field(default_factory=list)
    mtimes: list[int] = field(default_factory=list)
    """``st_mtime_ns`` of each file."""
    dirs: dict[str, int] = field(default_factory=dict)
    """Every directory visited (``"."`` is the root), relative path → ``st_mtime_ns`` (-1: too recent to trust)."""
    problems: dict[str, str] = field(default_factory=dict)
    """Entries that could not be listed or followed, relative path → reason."""

    def labels(self) -> tuple[list[int] | None, list[str]]:
        """Labels from class subfolders (the first path component), or ``None`` when any image lies
        at the top level (then the folder is unlabelled); and the class names."""
        parts = [f.split("/", 1) for f in self.files]
        if not parts or any(len(p) == 1 for p in parts):
            return None, []
        classes = sorted({p[0] for p in parts})
        index = {c: i for i, c in enumerate(classes)}
        return [index[p[0]] for p in parts], classes


def list_folder(root: str | Path, suffixes: frozenset[str] | set[str] = IMAGE_SUFFIXES) -> FolderListing:
    """Every image file (``suffixes``: other kinds of file, e.g. videos) under ``root`` with its size and mtime; see
    the module docstring for the rules."""
    base = Path(root).absolute()
    listing = FolderListing(base)
    visited: set[tuple[int, int]] = set()
    found: list[tuple[str, int, int]] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        path = base / rel if rel else base
        try:
            st = os.stat(path)
        except OSError as exc:
            listing.problems[rel] = f"unreadable directory: {exc.strerror}"
            continue
        if (st.st_dev, st.st_ino) in visited:  # a symlink back to a directory already walked
            continue
        visited.add((st.st_dev, st.st_ino))
        listing.dirs[rel or "."] = st.st_mtime_ns if time.time_ns() - st.st_mtime_ns > RACY_NS else -1
        try:
            entries = list(os.scandir(path))
        except OSError as exc:
            listing.problems[rel or "."] = f"unreadable directory: {exc.strerror}"
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child = f"{rel}/{entry.name}" if rel else entry.name
            try:
                if entry.is_dir():  # follows symlinks; loops end at the visited check
                    stack.append(child)
                elif Path(entry.name).suffix.lower() in suffixes:
                    if not entry.is_file():
                        listing.problems[child] = "broken link or not a regular file"
                        continue
                    est = entry.stat()
                    found.append((child, est.st_size, est.st_mtime_ns))
            except OSError as exc:
                listing.problems[child] = f"cannot stat: {exc.strerror}"
    found.sort()
    listing.files = [f for f, _, _ in found]
    listing.sizes = [s for _, s, _ in found]
    listing.mtimes = [m for _, _, m in found]
    return listing


@dataclass
class FolderChanges:
    added: int = 0
    removed: int = 0
    modified: int = 0
    dirs: int = 0
    """Directories whose modification time changed (the fast check sees only these)."""
    retried: int = 0
    """Skipped files this process may now read (an older decoder's decode errors, HEIC before pi-heif)."""

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.modified or self.dirs or self.retried)

    def __str__(self) -> str:
        parts = [f"{n} {what}" for n, what in ((self.added, "added"), (self.removed, "removed"),
                                                (self.modified, "modified"),
                                                (self.retried, "unreadable before, retried")) if n]
        if self.dirs and not parts:
            parts.append(f"{self.dirs} director{'y' if self.dirs == 1 else 'ies'} changed")
        return ", ".join(parts) or "no changes"


def directory_changes(root: Path, dirs: dict[str, int]) -> FolderChanges:
    """The fast check: a stat of each recorded directory. Adding, removing or renaming a file changes
    its directory's mtime (and a new subdirectory its parent's); rewriting a file in place does not
    — :func:`file_changes` sees that."""
    changed = 0
    for rel, mtime in dirs.items():
        try:
            now = os.stat(root / rel if rel != "." else root).st_mtime_ns
        except OSError:
            now = None
        changed += now != mtime
    return FolderChanges(dirs=changed)


def file_changes(before: FolderListing, now: FolderListing) -> FolderChanges:
    """The full check: image files added, removed, or with another size or mtime (a directory whose
    mtime changed for another reason, say a text file added, is no change)."""
    old = {f: (s, m) for f, s, m in zip(before.files, before.sizes, before.mtimes)}
    new = {f: (s, m) for f, s, m in zip(now.files, now.sizes, now.mtimes)}
    modified = sum(1 for f, v in new.items() if f in old and old[f] != v)
    return FolderChanges(len(new.keys() - old.keys()), len(old.keys() - new.keys()), modified)
