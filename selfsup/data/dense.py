"""Images with dense annotations: semantic masks, boxes and (procedural scenes) instance masks.

A :class:`DenseSet` pairs an :class:`~selfsup.data.imageset.ImageSet` with annotations in the same order and the
same geometry: each mask is a uint8 record (1, S, S) of class ids at the image record's stored side S — the whole
image squashed to a square as the image record is, so the crops and the letterboxed evaluation view of
:mod:`selfsup.views.dense` cut both with the same boxes —, held as an ``ImageSet`` too (in RAM, or memory-mapped
from the dense cache beside the image cache: :mod:`selfsup.data.annotations`). Class 0 is the background, 255
is ignored (VOC's convention, also for COCO crowd regions). Boxes are stored for all images back to back, as
(x0, y0, x1, y1) fractions of the image's width and height, so they need no rescaling when the image is.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor

from selfsup.data.imageset import DataError, ImageSet
from selfsup.data.splits import parse_fraction

IGNORE = 255
"""Mask value of pixels no class is scored on (VOC's boundary pixels, COCO's crowd regions, padding)."""
BACKGROUND = 0


@dataclass
class DenseSet:
    images: ImageSet
    classes: list[str]
    """Class names by id; id 0 is the background."""
    masks: ImageSet | None = None
    """uint8 (N, 1, S, S) class ids aligned with ``images``' records; ``None`` when only boxes are annotated."""
    boxes: Tensor | None = None
    """float32 (M, 4): every image's boxes back to back, (x0, y0, x1, y1) as fractions of its width and height."""
    box_labels: Tensor | None = None
    """int64 (M,): class id of each box (1 … K; never the background)."""
    box_crowd: Tensor | None = None
    """bool (M,): COCO ``iscrowd`` boxes, scored as regions to ignore, never trained on."""
    box_start: Tensor | None = None
    """int64 (N + 1,): image i's boxes are rows ``box_start[i]:box_start[i + 1]``."""
    instances: ImageSet | None = None
    """uint8 (N, 1, S, S) instance ids (0 none; id k + 1 is the image's k-th box); procedural scenes only."""
    sizes: Tensor | None = None
    """int64 (N, 2): each image's original (width, height) in pixels, for boxes and areas in pixels."""
    name: str = "dense"
    sources: dict | None = None
    """What the annotations were read from (format, files, skipped images with a reason), for the results."""

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.masks is not None and len(self.masks) != n:
            raise DataError(f"{self.name}: {n} images but {len(self.masks)} masks")
        if self.box_start is None:
            self.box_start = torch.zeros(n + 1, dtype=torch.long)
            self.boxes = torch.zeros(0, 4)
            self.box_labels = torch.zeros(0, dtype=torch.long)
        if self.box_crowd is None:
            self.box_crowd = torch.zeros(len(self.box_labels), dtype=torch.bool)
        if len(self.box_start) != n + 1:
            raise DataError(f"{self.name}: {n} images but box offsets for {len(self.box_start) - 1}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        """Classes including the background (the segmentation head's outputs)."""
        return len(self.classes)

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    @property
    def has_boxes(self) -> bool:
        return int(self.box_start[-1]) > 0

    def boxes_of(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """(boxes (k, 4) fractions, labels (k,), crowd (k,)) of image ``i``."""
        a, b = int(self.box_start[i]), int(self.box_start[i + 1])
        return self.boxes[a:b], self.box_labels[a:b], self.box_crowd[a:b]

    def subset(self, index: Tensor | Sequence[int]) -> "DenseSet":
        index = torch.as_tensor(index, dtype=torch.long)
        counts = (self.box_start[1:] - self.box_start[:-1])[index]
        rows = torch.cat([torch.arange(int(self.box_start[i]), int(self.box_start[i + 1])) for i in index.tolist()]
                         ) if len(index) else torch.zeros(0, dtype=torch.long)
        start = torch.zeros(len(index) + 1, dtype=torch.long)
        start[1:] = counts.cumsum(0)
        pick = lambda s: None if s is None else s.subset(index)
        return replace(self, images=self.images.subset(index), masks=pick(self.masks), instances=pick(self.instances),
                       boxes=self.boxes[rows], box_labels=self.box_labels[rows], box_crowd=self.box_crowd[rows],
                       box_start=start, sizes=None if self.sizes is None else self.sizes[index])

    def class_presence(self) -> Tensor:
        """bool (N, num_classes): which object classes each image shows (its boxes' labels, and where masks exist
        the ids found in its mask; background and ignore not counted). Read in chunks: a file-backed mask set is
        never loaded whole."""
        present = torch.zeros(len(self), self.num_classes, dtype=torch.bool)
        image_of = torch.repeat_interleave(torch.arange(len(self)), self.box_start[1:] - self.box_start[:-1])
        keep = self.box_labels < self.num_classes
        present[image_of[keep], self.box_labels[keep]] = True
        if self.masks is not None:
            for start in range(0, len(self), 1024):
                idx = torch.arange(start, min(start + 1024, len(self)))
                m = self.masks.batch(idx).flatten(1).long()
                m = torch.where(m == IGNORE, BACKGROUND, m).clamp(max=self.num_classes - 1)
                hits = torch.zeros(len(idx), self.num_classes, dtype=torch.bool)
                hits.scatter_(1, m, True)
                present[idx] |= hits
        present[:, BACKGROUND] = False
        return present


def dense_label_subset(dense: DenseSet, amount: str | float | int, seed: int) -> Tensor:
    """Indices of the labelled images a dense protocol trains on: a fraction of the images (``"1%"``) or
    ``"N-shot"`` (N images showing each class), drawn with ``seed``.

    Images hold several classes, so a class-by-class split as for labels per image is not possible; instead the
    draw is covering: a random ``round(f·N)`` images (at least one), then, for every class the whole split shows
    but the draw missed, one random image that shows it — so no class is left without a single example (a
    probe could never predict it). The subset can thus be up to K images larger than ``f·N``; results record
    its size. N-shot draws N images per class (each showing it; fewer when the class has fewer), their union.
    """
    value = parse_fraction(amount) if isinstance(amount, str) else amount
    g = torch.Generator().manual_seed(seed)
    presence = dense.class_presence()
    shown = presence.any(0).nonzero().flatten().tolist()
    if isinstance(value, int):
        chosen: set[int] = set()
        for c in shown:
            carriers = presence[:, c].nonzero().flatten()
            chosen.update(carriers[torch.randperm(len(carriers), generator=g)[:value]].tolist())
        return torch.tensor(sorted(chosen), dtype=torch.long)
    n = len(dense)
    k = max(1, int(round(float(value) * n)))
    chosen = set(torch.randperm(n, generator=g)[:k].tolist())
    for c in shown:
        if not any(presence[i, c] for i in chosen):
            carriers = presence[:, c].nonzero().flatten()
            chosen.add(int(carriers[torch.randint(len(carriers), (1,), generator=g)]))
    return torch.tensor(sorted(chosen), dtype=torch.long)


def check_dense(dense: DenseSet, protocol: str) -> None:
    """A clear error when a protocol is asked of annotations it cannot use."""
    if protocol.startswith("segmentation") and not dense.has_masks:
        raise DataError(f"{dense.name}: segmentation needs masks; these annotations hold only boxes "
                        "(a COCO file with segmentation polygons/RLE, or a folder of PNG class masks)")
    if protocol.startswith("detection") and not dense.has_boxes:
        raise DataError(f"{dense.name}: detection needs boxes; these annotations hold none (a COCO file with "
                        "bbox entries, VOC Annotations/*.xml, or SegmentationObject instance masks)")
