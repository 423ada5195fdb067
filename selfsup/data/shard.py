"""Records of a cache shard read with positioned reads (``preadv``) into a fresh array, never through a map.

A memory-mapped shard would be simpler to index, but every page a process touches through a mapping
stays counted in its resident memory (``RssFile``) until the mapping goes: a process streaming a
4 GB shard once per epoch would end the epoch 4 GB "larger" — and look like a leak to the user, to
``ru_maxrss``, to schedulers that limit resident memory and to the OOM killer's score — although the
pages belong to the OS page cache. A positioned read copies the record out of the page cache instead
(one system call per run of consecutive records, about as fast as the page faults it replaces), so
a process holds only the batches it asked for whatever the size of the collection.

The file is opened once, when the shard is opened: a cache rebuilt meanwhile by another process
(renamed aside, then deleted) keeps being read from the open file until this set is dropped, as a
mapping would.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from selfsup.data.imageset import DataError


class ShardTruncated(DataError):
    """The shard ended before a record that its manifest says it holds."""


class RecordFile:
    """``count`` uint8 records of ``shape`` stored back to back in ``path``, record k at ``k · nbytes``."""

    def __init__(self, path: str | Path, count: int, shape: tuple[int, ...]):
        self.path = str(path)
        self.count = count
        self.shape = tuple(int(s) for s in shape)
        self.record_bytes = int(np.prod(self.shape))
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __getstate__(self) -> dict:  # another process (spawned worker) opens the file again
        state = dict(self.__dict__)
        del state["_fd"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def read(self, rows: np.ndarray) -> np.ndarray:
        """uint8 (len(rows), *shape): the records at ``rows`` (ascending order reads fastest: neighbouring
        records are read with one call)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape), dtype=np.uint8)
        if len(rows) == 0:
            return out
        if rows.min() < 0 or rows.max() >= self.count:
            raise IndexError(f"record index out of range 0..{self.count - 1}")
        flat = out.reshape(len(rows), self.record_bytes)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        ends = np.concatenate((breaks, [len(rows)])).tolist()
        first = rows[starts].tolist()
        for s, e, r in zip(starts, ends, first):
            self._read_into(memoryview(flat[s:e]).cast("B"), r * self.record_bytes)
        return out

    def read_all(self) -> np.ndarray:
        """Every record, in order (one sequential read)."""
        return self.read(np.arange(self.count))

    def _read_into(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise ShardTruncated(f"{self.path} ends at byte {offset + done:,}, before the records its manifest "
                                     "lists; the cache is damaged (it is rebuilt on the next use)")
            done += n
