"""Batches read ahead in a background thread, for file-backed image sets.

Reading a batch from a memory-mapped cache is a gather that may wait on the disk (page faults) —
time the training step could use. :func:`prefetch_batches` reads the next ``depth`` batches in one
thread while the caller augments and trains on the current one. Measured here
(benchmarks/data/README.md): always faster than ``DataLoader`` worker processes, which send every
batch through shared memory; as fast as reading inline when the cache is in the page cache and the
step runs on one thread, twice as fast with two torch threads.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator

import torch
from torch import Tensor

from selfsup.data.imageset import ImageSet

_DONE = object()


def prefetch_batches(images: ImageSet, batches: Iterable[Tensor], depth: int = 2,
                     pin_memory: bool = False) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """``(idx, uint8 (B, C, S, S), aspect (B,) or None)`` for each index batch of ``batches``, in order,
    read up to ``depth`` batches ahead. ``pin_memory`` pins each batch (faster, asynchronous copies to a
    GPU). An error in the reader is raised here; leaving the loop early stops the reader."""
    if depth < 1:
        raise ValueError(f"prefetch depth must be ≥ 1, got {depth}")
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for idx in batches:
                idx = torch.as_tensor(idx, dtype=torch.long)
                x = images.batch(idx)
                if pin_memory:
                    x = x.pin_memory()
                aspect = images.aspect_at(idx)
                if not put((idx, x, aspect)):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    reader = threading.Thread(target=read, name="selfsup-prefetch", daemon=True)
    reader.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join()
