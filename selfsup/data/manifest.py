"""The on-disk format of an image-folder cache: ``manifest.json`` beside one ``images.u8`` shard.

``images.u8`` is raw uint8 records of fixed shape (C, S, S), record k at byte offset k·C·S², no
header: a batch is one fancy index on a ``numpy.memmap`` and the OS page cache does the rest.
``manifest.json`` says how it was made and from what::

    {"format": 1, "folder": "/abs/path", "settings": {"size": S, "resize": "squash", ...},
     "channels": C, "count": N, "shard": "images.u8", "classes": [...], "labelled": true,
     "dirs": {".": mtime_ns, "cat": mtime_ns, ...},        # for the fast change check
     "files": {"path": [...], "size": [...], "mtime_ns": [...], "label": [...],
               "width": [...], "height": [...], "aspect": [...], "gray": [...],
               "index": [...],   # record number, or -1 when skipped
               "skip": [...]},   # null, or why the file was skipped ("truncated: ...")
     "problems": {"rel/path": "broken link or not a regular file", ...},
     "build": {"seconds": ..., "decoded": ..., "reused": ..., "workers": ..., "created": "...",
               "decoder": DECODER_VERSION}}

Files are columns (one list per field, in sorted path order) so a million-file manifest stays a
few lists that ``json`` parses quickly. Stored files fill records 0..N-1 in path order.

A cache whose files give several records each (videos, :mod:`selfsup.data.video_folder`) has ``settings.frames``
= L frames per record, so C is L × the frame's 1 or 3 channels, and a ``records`` column (how many records each
file gave, from record ``index`` on) beside the columns its decoder adds.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from selfsup.data.decode import DECODER_VERSION, HEIF_MISSING, heif_readable
from selfsup.data.folder import FolderListing

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD = "images.u8"
COLUMNS = ("path", "size", "mtime_ns", "label", "width", "height", "aspect", "gray", "index", "skip")


class CacheDamaged(Exception):
    """A cache directory that cannot be used as it is (it is rebuilt); the message says why."""


@dataclass
class Manifest:
    folder: str
    settings: dict[str, Any]
    channels: int
    count: int
    classes: list[str]
    labelled: bool
    dirs: dict[str, int]
    files: dict[str, list]
    problems: dict[str, str] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT_VERSION
    shard: str = SHARD

    @property
    def record_shape(self) -> tuple[int, int, int, int]:
        s = int(self.settings["size"])
        return self.count, self.channels, s, s

    @property
    def shard_bytes(self) -> int:
        n, c, s, _ = self.record_shape
        return n * c * s * s

    def listing(self) -> FolderListing:
        return FolderListing(Path(self.folder), list(self.files["path"]), list(self.files["size"]),
                             list(self.files["mtime_ns"]), dict(self.dirs), dict(self.problems))

    def skipped(self) -> dict[str, str]:
        """Every file left out, relative path → reason (unreadable images and listing problems)."""
        out = {p: r for p, r in zip(self.files["path"], self.files["skip"]) if r is not None}
        out.update(self.problems)
        return out

    def retryable(self) -> set[int]:
        """Positions (in ``files``) of skipped files this process may now read: those an older decoder failed on
        with a decode error (caches from before the version count as 1), and HEIC files skipped for want of
        pi-heif where it is now installed."""
        older = int(self.build.get("decoder", 1)) < DECODER_VERSION
        return {i for i, r in enumerate(self.files["skip"]) if r is not None and (
            (older and r.startswith("decode error")) or (r.startswith(HEIF_MISSING) and heif_readable()))}

    def stored(self) -> list[int]:
        """Positions (in ``files``) of the stored images, in record order."""
        return [i for i, k in enumerate(self.files["index"]) if k >= 0]

    def records(self, i: int) -> int:
        """How many records the file at position ``i`` gave (an image: 1, or 0 when skipped)."""
        if "records" in self.files:
            return int(self.files["records"][i] or 0)
        return int(self.files["index"][i] >= 0)

    def record_files(self) -> list[int]:
        """For each record, in order, the position (in ``files``) of the file it came from."""
        return [i for i in self.stored() for _ in range(self.records(i))]

    def mismatch(self, folder: str, settings: dict[str, Any]) -> str | None:
        """Why this manifest is not the cache of ``folder`` built with ``settings``, or None."""
        if self.format != FORMAT_VERSION:
            return f"cache format {self.format}, this selfsup reads format {FORMAT_VERSION}"
        if self.folder != folder:
            return f"built from another folder ({self.folder})"
        if self.settings != settings:
            return f"built with other settings ({self.settings}, wanted {settings})"
        missing = [c for c in COLUMNS if c not in self.files] if isinstance(self.files, dict) else COLUMNS
        if missing or len({len(v) for v in self.files.values()}) > 1:
            return "the manifest's file table is incomplete"
        frames = int(self.settings.get("frames", 1))
        if self.count != sum(self.records(i) for i in self.stored()) or self.channels not in (frames, 3 * frames):
            return "the manifest's record count or channels are inconsistent"
        return None

    def write(self, directory: Path) -> None:
        """Atomically (a temporary file renamed over the old one) and durably (fsync)."""
        tmp = directory / f".{MANIFEST}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / MANIFEST)

    @staticmethod
    def read(directory: Path) -> "Manifest":
        """Raises ``FileNotFoundError`` when there is none, :class:`CacheDamaged` when it is unusable."""
        path = directory / MANIFEST
        try:
            data = json.loads(path.read_text())
            return Manifest(**data)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, TypeError) as exc:
            raise CacheDamaged(f"unreadable manifest {path}: {type(exc).__name__}: {exc}") from None
