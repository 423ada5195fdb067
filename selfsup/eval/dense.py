"""The dense protocols: segmentation and detection with few labels, on frozen or fine-tuned encoders.

``selfsup evaluate RUN --protocol segmentation | segmentation_finetune | detection | detection_finetune``:

- ``segmentation``: DINOv2's linear protocol on the frozen encoder (:class:`~selfsup.nn.dense_heads.LinearSegHead`:
  BatchNorm + 1×1 conv on the last map, or the last ``levels`` maps concatenated); beside a frozen random encoder
  of the same architecture.
- ``segmentation_finetune``: the whole encoder with a light semantic-FPN decoder, trained end to end; beside the
  same network trained from scratch with the same recipe.
- ``detection``: torchvision's FCOS over the frozen encoder's last levels (an FPN and the heads train); beside a
  frozen random encoder.
- ``detection_finetune``: the same detector with the encoder trained too; beside it from scratch.

Every variant trains on the labelled training images (all, or a label fraction drawn by
:func:`~selfsup.data.dense.dense_label_subset`), with random resized crops and flips that move masks and boxes with
the pixels (:func:`~selfsup.views.dense.dense_crop_flip`), AdamW, a linear warm-up and a cosine decay, for a number
of steps that grows with the label count (:class:`DenseSettings`); then it is scored once on the whole test split,
each image seen whole through :func:`~selfsup.views.dense.letterbox`: mIoU, per-class IoU and pixel accuracy
(:mod:`selfsup.eval.segmentation`), COCO AP, AP50 and AP75 through pycocotools (:mod:`selfsup.eval.detection`).
Masks are scored at the evaluation view's resolution (the encoder's image size), boxes in the original image's
pixels. The encoders, heads and training draws are seeded, so a result is reproducible from its seed.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from selfsup.config import ConfigError
from selfsup.data.dense import DenseSet
from selfsup.eval.finetune import shuffled_batches
from selfsup.schedules import warmup_cosine
from selfsup.views import to_float
from selfsup.views.dense import DenseViews, dense_crop_flip, letterbox

DENSE_PROTOCOLS = ("segmentation", "segmentation_finetune", "detection", "detection_finetune")
METRICS = {"segmentation": "mIoU", "segmentation_finetune": "mIoU", "detection": "AP", "detection_finetune": "AP"}


@dataclass(frozen=True)
class DenseSettings:
    """One recipe for every dense protocol; steps scale with the label count as :class:`~selfsup.eval.finetune.
    FinetuneSettings` do: ``epochs`` passes over the labelled images, within [``min_steps``, ``max_steps``]."""

    epochs: int = 20
    min_steps: int = 300
    max_steps: int = 800
    batch_size: int = 32
    lr: float = 1e-3
    """AdamW peak learning rate of the heads (and of the encoder when fine-tuned)."""
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip_p: float = 0.5
    levels: int = 1
    """The frozen linear head's maps: 1 (the last) or 4 (the last four concatenated, DINOv2's "+ms" variant)."""
    decoder_levels: int = 4
    """Levels the fine-tuned segmentation decoder (FPN) reads."""
    detector_levels: int = 3
    """Levels the detector's FPN reads (a ViT: its last block, made into three scales)."""
    width: int = 64
    """Channels of the FPN and of the heads (a multiple of 32)."""

    def __post_init__(self) -> None:
        problems = [f"dense protocol setting {k} must be ≥ 1, got {getattr(self, k)}"
                    for k in ("epochs", "min_steps", "max_steps", "batch_size", "levels", "decoder_levels",
                              "detector_levels", "width") if getattr(self, k) < 1]
        if self.width % 32:
            problems.append(f"dense protocol width must be a multiple of 32 (FCOS's heads use GroupNorm with 32 "
                            f"groups), got {self.width}")
        if not self.lr > 0:
            problems.append(f"dense protocol lr must be > 0, got {self.lr}")
        if problems:
            raise ConfigError(problems)

    def steps_for(self, n_labels: int) -> int:
        batch = min(self.batch_size, n_labels)
        return int(min(self.max_steps, max(self.min_steps, math.ceil(self.epochs * n_labels / batch))))

    def to_dict(self, n_labels: int) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "optimizer": "adamw", "schedule": "linear warm-up + cosine",
                "augmentation": "random resized crop + horizontal flip (masks and boxes moved with the pixels)",
                "steps": self.steps_for(n_labels), "effective_batch_size": min(self.batch_size, n_labels)}


def read_batch(dense: DenseSet, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor | None, list[Tensor], list[Tensor], Tensor | None]:
    """(float images (B, C, S, S) in [0, 1] on ``device``, uint8 masks (B, 1, S, S) or None, boxes and labels per
    image (fractions; crowd boxes left out), aspect (B,) or None)."""
    x = to_float(dense.images.batch(idx).to(device))
    masks = None if dense.masks is None else dense.masks.batch(idx).to(device)
    boxes, labels = [], []
    for i in idx.tolist():
        b, lab, crowd = dense.boxes_of(i)
        boxes.append(b[~crowd])
        labels.append(lab[~crowd])
    aspect = dense.images.aspect_at(idx)
    return x, masks, boxes, labels, None if aspect is None else aspect.to(device)


def training_views(dense: DenseSet, settings: DenseSettings, steps: int, seed: int, size: int,
                   device: torch.device) -> Iterator[tuple[int, DenseViews, list[Tensor]]]:
    """(step, the views (images in [0, 1], not normalised), box labels per view) for ``steps`` shuffled batches."""
    generator = torch.Generator().manual_seed(seed)
    batch = min(settings.batch_size, len(dense))
    for step, idx in enumerate(shuffled_batches(len(dense), batch, steps, generator)):
        x, masks, boxes, labels, aspect = read_batch(dense, idx, device)
        with torch.no_grad():
            views = dense_crop_flip(x, masks, boxes, size, settings.crop_scale, flip_p=settings.flip_p, aspect=aspect)
        kept_labels = [lab[k] for lab, k in zip(labels, views.box_index)]
        yield step, views, kept_labels


def test_views(dense: DenseSet, size: int, device: torch.device, batch_size: int = 64) -> Iterator[tuple[Tensor, DenseViews, list[Tensor], list[Tensor]]]:
    """(indices, letterboxed views, box labels, crowd flags) of the whole set in order."""
    for start in range(0, len(dense), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(dense)))
        x = to_float(dense.images.batch(idx).to(device))
        masks = None if dense.masks is None else dense.masks.batch(idx).to(device)
        parts = [dense.boxes_of(i) for i in idx.tolist()]
        aspect = dense.images.aspect_at(idx)
        views = letterbox(x, masks, [p[0] for p in parts], size, None if aspect is None else aspect.to(device))
        yield idx, views, [p[1] for p in parts], [p[2] for p in parts]


def adamw(model: nn.Module, settings: DenseSettings) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, without weight decay on biases and norms."""
    decay, exempt = [], []
    for p in model.parameters():
        if p.requires_grad:
            (exempt if p.ndim <= 1 else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": exempt, "weight_decay": 0.0}], lr=settings.lr)


def set_lr(optimizer: torch.optim.Optimizer, step: int, steps: int, settings: DenseSettings) -> None:
    lr = warmup_cosine(step, steps, int(settings.warmup_fraction * steps), settings.lr)
    for g in optimizer.param_groups:
        g["lr"] = lr



def fit(model: nn.Module, train: DenseSet, settings: DenseSettings, seed: int, device: torch.device,
        loss_of: Callable[[DenseViews, list[Tensor]], Tensor]) -> dict[str, Any]:
    """Train ``model`` in place on ``train``'s views for :meth:`DenseSettings.steps_for` steps: AdamW, linear warm-up
    and cosine; ``loss_of(views, box labels)`` is the protocol's loss. Returns the steps, seconds and final loss."""
    torch.manual_seed(seed)
    model.to(device).train()
    optimizer = adamw(model, settings)
    steps = settings.steps_for(len(train))
    t0 = time.perf_counter()
    losses = []
    for step, views, labels in training_views(train, settings, steps, seed, train.images.image_size, device):
        set_lr(optimizer, step, steps, settings)
        loss = loss_of(views, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    tail = losses[-20:]
    return {"steps": steps, "time_s": time.perf_counter() - t0, "final_loss": sum(tail) / max(1, len(tail))}
