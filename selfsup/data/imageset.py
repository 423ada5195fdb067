"""The in-memory image collection every dataset loads into.

Images are kept as one ``uint8`` tensor of shape (N, C, H, W): small vision datasets fit in
memory many times over, and a batch is then one index operation that can be moved to the
training device and augmented there in one go (no per-image Python work in the hot loop).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


class DataError(ValueError):
    """Data the user must fix or provide; the message says what and how."""


@dataclass
class ImageSet:
    images: torch.Tensor
    """uint8, (N, C, H, W)."""
    labels: torch.Tensor | None = None
    """int64, (N,); ``None`` when the images carry no labels."""
    classes: list[str] = field(default_factory=list)
    name: str = "images"
    paths: list[str] | None = None
    """Source file of each image (image folders only)."""
    skipped: int = 0
    """Files that could not be read and were left out."""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DataError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def num_classes(self) -> int:
        if self.classes:
            return len(self.classes)
        return int(self.labels.max()) + 1 if self.labels is not None and len(self.labels) else 0

    def subset(self, index: torch.Tensor | np.ndarray | list[int]) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(
            images=self.images[index],
            labels=None if self.labels is None else self.labels[index],
            classes=self.classes,
            name=self.name,
            paths=None if self.paths is None else [self.paths[i] for i in index.tolist()],
            skipped=self.skipped,
        )

    def head(self, n: int | None) -> "ImageSet":
        return self if n is None or n >= len(self) else self.subset(torch.arange(n))

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of pixel values in [0, 1] (used to normalise every view)."""
        x = self.images[: min(len(self), 20000)].float().div_(255)
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return mean.tolist(), std.tolist()

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
    def from_arrays(images: np.ndarray | torch.Tensor, labels=None, name: str = "arrays", classes=None) -> "ImageSet":
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
