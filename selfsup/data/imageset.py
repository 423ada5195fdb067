"""The image collection every dataset loads into: uint8 records of shape (C, S, S), in RAM or on disk.

Small datasets (Fashion-MNIST, CIFAR, digits) live in one in-memory ``uint8`` tensor (N, C, H, W).
Image folders are decoded once into an on-disk cache (:mod:`selfsup.data.cache`) and read through
a memory map: nothing is loaded until a batch asks for it, and the OS page cache keeps hot pages
for every process on the machine. Either way a batch is one gather (:meth:`ImageSet.batch`) that
can be moved to the training device and augmented there in one go.

A file-backed set is a *view*: :meth:`subset`, :meth:`head` and :meth:`with_channels` keep an
index into the shared file instead of copying pixels. In-memory sets copy their (small) rows, as
they always did, so ``.images`` stays a plain tensor that is cheap to slice repeatedly.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from selfsup.data.shard import RecordFile


class DataError(ValueError):
    """Data the user must fix or provide; the message says what and how."""


STATS_VALUES = 2**25
"""Pixel values an image folder's normalisation statistics are computed from (:meth:`ImageSet.mean_std`)."""
STATS_MIN_IMAGES = 1000
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, the weights PIL's convert("L") uses


def convert_channels(x: Tensor, channels: int, frames: int = 1) -> Tensor:
    """uint8 (B, C, H, W) → (B, ``channels``, H, W): grayscale repeated to RGB, RGB to its luma. With ``frames``
    L > 1 the records are clips (B, L·C, H, W), frame-major, converted frame by frame to (B, L·channels, H, W)."""
    if frames > 1:
        b = x.shape[0]
        per_frame = convert_channels(x.unflatten(1, (frames, -1)).flatten(0, 1), channels)
        return per_frame.unflatten(0, (b, frames)).flatten(1, 2)
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor(_LUMA).view(1, 3, 1, 1)
        return (x.float() * w).sum(dim=1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise DataError(f"cannot convert {c}-channel images to {channels} channels")


class ImageSet:
    """N uint8 images (C, S, S) with optional labels, source paths and aspect ratios.

    ``aspect`` (N,) float32 is each image's original width / height when the stored pixels are the
    whole image squashed to a square (image-folder caches); ``None`` means the pixels are the image
    (aspect 1). ``image_size`` is the side views and encoders use; it is the stored side S unless
    given (a cache stores S > image_size so random crops keep detail).
    """

    kind = "images"
    """What the records are (:class:`~selfsup.data.clips.ClipSet` says ``"clips"``)."""

    def __init__(self, images: Tensor, labels: Tensor | None = None, classes: Sequence[str] | None = None,
                 name: str = "images", paths: list[str] | None = None, skipped: int = 0, *,
                 aspect: Tensor | None = None, image_size: int | None = None, mapped: bool = False,
                 rows: Tensor | None = None, convert: tuple[tuple[int, int], ...] = (), source: str | None = None,
                 file: "RecordFile | None" = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"{name}: images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self._pixels = images
        """The backing records (M, C, S, S): this set's rows, or (``rows`` given) a shared file's."""
        self._rows = rows
        self._convert = convert
        """Channel conversions applied to each batch, in order, as (channels per frame, frames per record) (file-backed
        sets convert lazily)."""
        self.mapped = mapped
        """True when the records are a memory-mapped cache file (read on demand, never all in RAM)."""
        self._file = file
        """The same cache file opened for positioned reads (:mod:`selfsup.data.shard`): what :meth:`batch` reads
        with, so the pages it reads are never counted in this process's resident memory; ``None``: read through
        the memory map."""
        self.labels = labels
        """int64 (N,); ``None`` when the images carry no labels."""
        self.classes = list(classes or [])
        self.name = name
        self.paths = paths
        """Source file of each image (image folders only)."""
        self.skipped = skipped
        """Files that could not be read and were left out."""
        self.aspect = aspect
        self._image_size = image_size
        self.source = source
        """Where the records live on disk (a cache directory), if anywhere."""
        n = len(self)
        for what, value in (("labels", labels), ("aspect ratios", aspect), ("paths", paths)):
            if value is not None and len(value) != n:
                raise DataError(f"{name}: {n} images but {len(value)} {what}")

    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else len(self._pixels)

    def __repr__(self) -> str:
        where = f", mapped from {self.source}" if self.mapped else ""
        return (f"ImageSet({self.name!r}, {len(self)} × ({self.channels}, {self.stored_size}, {self.stored_size})"
                f"{', with aspect ratios' if self.aspect is not None else ''}{where})")

    @property
    def channels(self) -> int:
        if self._convert:
            per_frame, frames = self._convert[-1]
            return per_frame * frames
        return int(self._pixels.shape[1])

    @property
    def stored_size(self) -> int:
        """Side S of the records :meth:`batch` returns."""
        return int(self._pixels.shape[-1])

    @property
    def image_size(self) -> int:
        """Side of the views and of the encoder's input."""
        return self._image_size or self.stored_size

    @property
    def nbytes(self) -> int:
        """Bytes of this set's records (what holding it in RAM costs)."""
        return len(self) * self.channels * self.stored_size**2

    @property
    def num_classes(self) -> int:
        if self.classes:
            return len(self.classes)
        return int(self.labels.max()) + 1 if self.labels is not None and len(self.labels) else 0

    @property
    def images(self) -> Tensor:
        """All records, uint8 (N, C, S, S). Zero-copy for an in-memory or a whole file-backed set; a
        gather into RAM for a subset of a file (prefer :meth:`batch` there)."""
        if self._rows is None and not self._convert:
            return self._pixels
        return self.batch(torch.arange(len(self)))

    def aspect_at(self, idx: Tensor | Sequence[int]) -> Tensor | None:
        """Aspect ratios (B,) of the images at positions ``idx``, or None for a set without them (whose records
        are the images themselves): what every reader passes beside :meth:`batch` to the crops."""
        return None if self.aspect is None else self.aspect[torch.as_tensor(idx, dtype=torch.long)]

    def batch(self, idx: Tensor | Sequence[int]) -> Tensor:
        """Records of the images at positions ``idx`` (B,), in that order: uint8 (B, C, S, S) in RAM.

        A file-backed set reads them in ascending file order (neighbouring records share pages and
        readahead) and restores the requested order after.
        """
        idx = torch.as_tensor(idx, dtype=torch.long)
        rows = idx if self._rows is None else self._rows[idx]
        if not self.mapped:
            out = self._pixels[rows]
        else:
            ascending = len(rows) < 2 or bool((rows[1:] >= rows[:-1]).all())
            order = None if ascending else torch.argsort(rows)
            wanted = rows if order is None else rows[order]
            if self._file is not None:
                gathered = torch.from_numpy(self._file.read(wanted.numpy()))
            else:  # the memmap itself: numpy's gather reads only the rows it needs
                gathered = torch.from_numpy(np.take(self._pixels.numpy(), wanted.numpy(), axis=0))
            if order is None:
                out = gathered
            else:
                out = torch.empty_like(gathered)
                out[order] = gathered
        for channels, frames in self._convert:
            out = convert_channels(out, channels, frames)
        return out

    def _view(self, idx: Tensor | None, labels: Tensor | None, aspect: Tensor | None, paths: list[str] | None,
              convert: tuple[tuple[int, int], ...]) -> "ImageSet":
        rows = self._rows if idx is None else idx if self._rows is None else self._rows[idx]
        return ImageSet(self._pixels, labels, self.classes, self.name, paths, self.skipped, aspect=aspect,
                        image_size=self._image_size, mapped=True, rows=rows, convert=convert, source=self.source,
                        file=self._file)

    def subset(self, index: Tensor | np.ndarray | list[int]) -> "ImageSet":
        """The images at ``index``: an index view of a file-backed set, a copy of an in-memory one."""
        index = torch.as_tensor(index, dtype=torch.long)
        labels = None if self.labels is None else self.labels[index]
        aspect = self.aspect_at(index)
        paths = None if self.paths is None else [self.paths[i] for i in index.tolist()]
        if self.mapped:
            return self._view(index, labels, aspect, paths, self._convert)
        return ImageSet(self.batch(index), labels, self.classes, self.name, paths, self.skipped, aspect=aspect,
                        image_size=self._image_size, source=self.source)

    def head(self, n: int | None) -> "ImageSet":
        """The first ``n`` images: a view, never a copy (an in-memory set's leading rows are a slice)."""
        if n is None or n >= len(self):
            return self
        if self.mapped:
            return self.subset(torch.arange(n))
        return ImageSet(self._pixels[:n], None if self.labels is None else self.labels[:n], self.classes, self.name,
                        None if self.paths is None else self.paths[:n], self.skipped,
                        aspect=None if self.aspect is None else self.aspect[:n], image_size=self._image_size,
                        source=self.source)

    def with_channels(self, channels: int, frames: int = 1) -> "ImageSet":
        """The same images as ``channels``-channel records (gray repeated to RGB, RGB to luma), so an
        encoder can be used on any folder; file-backed sets convert per batch. ``frames``: records are clips of
        that many frames (:class:`~selfsup.data.clips.ClipSet`), ``channels`` is per frame, each converted."""
        have = self.channels // frames
        if channels == have:
            return self
        if have * frames != self.channels or have not in (1, 3) or channels not in (1, 3):
            raise DataError(f"the encoder takes {channels}-channel images, {self.name} has {have}")
        if self.mapped:
            return self._view(None, self.labels, self.aspect, self.paths, self._convert + ((channels, frames),))
        return ImageSet(convert_channels(self.images, channels, frames), self.labels, self.classes, self.name,
                        self.paths, self.skipped, aspect=self.aspect, image_size=self._image_size, source=self.source)

    def to_memory(self) -> "ImageSet":
        """The same set with its records copied into RAM (``self`` when they already are)."""
        if not self.mapped:
            return self
        if self._rows is None and not self._convert:  # one sequential read of the file
            pixels = torch.from_numpy(self._file.read_all() if self._file is not None else np.array(self._pixels.numpy()))
        else:
            pixels = self.images
        return ImageSet(pixels, self.labels, self.classes, self.name, self.paths, self.skipped, aspect=self.aspect,
                        image_size=self._image_size, source=self.source)

    def mean_std(self, sample: int = 20000, chunk: int = 256) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of pixel values in [0, 1] (used to normalise every view).

        Named datasets held in memory use their first ``sample`` images (as always: recorded runs stay
        reproducible). Image folders (``source`` set; streamed or loaded into RAM alike, so both give the same
        statistics) use images spread evenly over the set — folders are sorted by class, so the first ones
        would be a few classes — as many as hold :data:`STATS_VALUES` pixel values (1,548 RGB records of 85 px),
        at most ``sample``: a channel's mean and spread need no more, and reading 20,000 large records would
        dominate a run's start. Images are read ``chunk`` at a time and their values and squares summed exactly
        in integers, so the memory this takes grows with neither the image size nor the sample.
        """
        if self.source is None and not self.mapped:
            picks = torch.arange(min(len(self), sample))
        else:
            per_image = self.channels * self.stored_size**2
            n = min(len(self), sample, max(STATS_MIN_IMAGES, STATS_VALUES // per_image))
            picks = torch.linspace(0, len(self) - 1, n).round().long().unique()
        total = torch.zeros(self.channels, dtype=torch.int64)
        squares = torch.zeros(self.channels, dtype=torch.int64)
        for start in range(0, len(picks), chunk):
            x = self.batch(picks[start : start + chunk]).to(torch.int32)
            total += x.sum(dim=(0, 2, 3), dtype=torch.int64)
            squares += x.square_().sum(dim=(0, 2, 3), dtype=torch.int64)
        count = len(picks) * self.stored_size**2
        mean = total.double() / (255.0 * count)
        var = (squares.double() / 255.0**2 - count * mean.square()) / max(count - 1, 1)
        return mean.tolist(), var.clamp_min(0).sqrt().clamp_min(1e-3).tolist()

    def class_counts(self) -> dict[str, int] | None:
        """Images per class name (None for unlabelled data): what a long-tailed or limited run trained on."""
        if self.labels is None:
            return None
        counts = torch.bincount(self.labels, minlength=self.num_classes).tolist()
        return {str(name): int(n) for name, n in zip(self.classes or range(len(counts)), counts)}

    def describe(self) -> str:
        """``"N images of C classes (smallest–largest per class)"``, or ``"N unlabelled images"``."""
        counts = self.class_counts()
        if not counts:
            return f"{len(self)} unlabelled images"
        sizes = sorted(counts.values())
        return f"{len(self)} images of {len(counts)} classes ({sizes[0]}–{sizes[-1]} per class)"

    @staticmethod
    def from_arrays(images: np.ndarray | Tensor, labels=None, name: str = "arrays", classes=None) -> "ImageSet":
        """Images as (N, H, W), (N, H, W, C) or (N, C, H, W); uint8, or floats in [0, 1]."""
        x = torch.as_tensor(np.asarray(images))
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)
        if x.ndim != 4:
            raise DataError(f"{name}: expected images of shape (N, H, W[, C]), got {tuple(x.shape)}")
        if x.dtype != torch.uint8:
            x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
        y = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
        return ImageSet(x.contiguous(), y, list(classes or []), name)
