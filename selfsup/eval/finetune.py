"""Fine-tuning with few labels: the pretrained encoder plus a linear head, trained end to end.

The semi-supervised protocol of SimCLR (Chen et al. 2020, arXiv:2002.05709 §B.5) and SimCLRv2
(arXiv:2006.10029 §4), in miniature: a class-balanced label subset, light augmentation (random
resized crop with area 0.5–1 and horizontal flip), every layer trained with BatchNorm in train
mode, and the same recipe — steps, optimiser, schedule, data order and augmentation draws — for
a same-architecture encoder trained from scratch, so the gap between the two is what
pretraining bought. Accuracy is measured once, on the test split, after the last step (no
early stopping on test data).

Image folders (records are whole images squashed to squares, with their aspect ratios) are seen as
pretraining and the frozen-feature protocols see them: training crops are drawn in each original
image's pixel space (:func:`selfsup.views.ops.resized_crop_flip` with the set's ``aspect``), and the
test images are the centre square of the original (:func:`selfsup.monitor.features.extract_features`),
so a 3:1 panorama is never learnt or tested squashed. Sets without aspect ratios (in-memory datasets)
are cropped as they always were. Training images are read a batch at a time (:meth:`ImageSet.batch`, read
ahead by :func:`selfsup.data.prefetch_batches`), so fine-tuning on 100% of a folder too large for RAM holds
a few batches of it, never the whole set.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.config import ConfigError
from selfsup.data.clips import is_clips
from selfsup.data.imageset import DataError, ImageSet
from selfsup.data.stream import prefetch_batches
from selfsup.monitor.features import extract_features
from selfsup.eval.linear import fit_logistic
from selfsup.train.optim import param_groups
from selfsup.schedules import warmup_cosine
from selfsup.views import normalize, to_float
from selfsup.views.clips import random_clip
from selfsup.views.ops import resized_crop_flip


@dataclass(frozen=True)
class FinetuneSettings:
    """The recipe. Steps scale with the label count: ``epochs`` passes over the labelled images,
    at least ``min_steps`` (so 1% or few-shot subsets still train long enough) and at most
    ``max_steps`` (so 100% of a dataset stays a CPU-sized job)."""

    epochs: int = 30
    min_steps: int = 300
    max_steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    """AdamW peak learning rate (after a linear warm-up over ``warmup_fraction`` of the steps, then cosine to 0)."""
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip_p: float = 0.5
    head_init: str = "random"
    """``random``, or ``linear_probe``: the head starts as a logistic regression fitted on the frozen
    encoder's features (LP-FT, Kumar et al. 2022, arXiv:2202.10054), so early gradients from a random
    head do not distort pretrained features."""
    probe_l2: float = 1e-3
    layer_decay: float = 1.0
    """Layer-wise learning-rate decay (BEiT, Bao et al. 2021, arXiv:2106.08254; MAE's fine-tuning recipe,
    He et al. 2021, arXiv:2111.06377 §A.2, uses 0.75): a ViT's top block and the head train at the full rate,
    each block below at ``layer_decay`` times the one above, the patch embedding last — so the pretrained
    lower layers move least. 1 = one rate for all; below 1 needs a ViT encoder."""

    def __post_init__(self) -> None:
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.head_init not in ("random", "linear_probe"):
            raise ValueError(f"head_init must be 'random' or 'linear_probe', got {self.head_init!r}")

    def for_scratch(self) -> "FinetuneSettings":
        """The default recipe at the same budget (epochs, steps, batch): a from-scratch baseline gets the
        better of this and the shared recipe, so knobs chosen for pretrained weights (a probe-initialised
        head, layer-wise decay, a lower rate) cannot flatter the margin by handicapping random weights."""
        return FinetuneSettings(epochs=self.epochs, min_steps=self.min_steps, max_steps=self.max_steps,
                                batch_size=self.batch_size)

    def steps_for(self, n_labels: int) -> int:
        batch = min(self.batch_size, n_labels)
        return int(min(self.max_steps, max(self.min_steps, math.ceil(self.epochs * n_labels / batch))))

    def to_dict(self, n_labels: int) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "optimizer": "adamw", "schedule": "linear warm-up + cosine",
                "augmentation": "random resized crop + horizontal flip", "batchnorm": "train mode",
                "steps": self.steps_for(n_labels), "effective_batch_size": min(self.batch_size, n_labels)}


class Classifier(nn.Module):
    """An encoder (B, C, H, W) → (B, D) with a linear head → (B, num_classes) logits."""

    def __init__(self, encoder: nn.Module, num_features: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


def _channels_last(images: ImageSet) -> bool:
    """The faster convolution layout from 8×8 up (as the training loop decides). Conversions happen
    here, before any inference-mode feature extraction, so the weights stay trainable."""
    return images.image_size >= 8 and not is_clips(images)  # torch's channels_last is for 4-D tensors


def shuffled_batches(n: int, batch: int, steps: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Indices of ``steps`` batches: shuffled epochs, concatenated, so every image is seen equally often."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        idx, order = order[:batch], order[batch:]
        yield idx


def train_classifier(encoder: nn.Module, num_features: int, train: ImageSet, mean: Sequence[float],
                     std: Sequence[float], settings: FinetuneSettings, seed: int = 0,
                     device: torch.device | str = "cpu") -> Classifier:
    """``encoder`` plus a fresh linear head, trained end to end on ``train``'s labels (in place)."""
    if train.labels is None or len(train) == 0:
        raise DataError(f"{train.name}: fine-tuning needs labelled training images")
    device = torch.device(device)
    num_classes = train.num_classes
    torch.manual_seed(seed)  # the head's initialisation and the augmentation draws
    model = Classifier(encoder, num_features, num_classes).to(device)
    channels_last = _channels_last(train)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if settings.head_init == "linear_probe":
        _probe_head(model, train, mean, std, settings.probe_l2, device)
    optimizer = torch.optim.AdamW(_optimizer_groups(model, settings), lr=settings.lr)
    steps = settings.steps_for(len(train))
    batch = min(settings.batch_size, len(train))
    warmup = int(settings.warmup_fraction * steps)
    labels = train.labels.to(device)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    # one batch of records at a time (read ahead in a thread), never the whole set: 100% of the labels of a
    # large image folder is more than fits in RAM, let alone on the GPU; reading draws no random numbers,
    # so the crops and the order are those of indexing a set held whole
    reader = prefetch_batches(train, shuffled_batches(len(train), batch, steps, generator), pin_memory=device.type == "cuda")
    for step, (idx, records, aspect) in enumerate(reader):
        for g in optimizer.param_groups:
            g["lr"] = warmup_cosine(step, steps, warmup, settings.lr) * g["lr_scale"]
        with torch.no_grad():
            # aspect None: sets without aspect ratios are cropped as before aspects existed
            records, aspect = records.to(device, non_blocking=True), None if aspect is None else aspect.to(device)
            if is_clips(train):  # the encoder's clip, from a random start; one crop and flip per clip
                x = random_clip(records, train.channels, *train.eval_clip, train.image_size, settings.crop_scale,
                                settings.flip_p, aspect)
            else:
                x = resized_crop_flip(to_float(records), train.image_size, settings.crop_scale, (3 / 4, 4 / 3),
                                      settings.flip_p, aspect)
            x = normalize(x, mean, std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), labels[idx.to(device)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return model


def check_layer_decay(encoder: nn.Module, settings: FinetuneSettings) -> None:
    """Layer-wise decay needs an encoder made of numbered blocks: a ViT. Called before any training too."""
    if settings.layer_decay == 1.0:
        return
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(encoder, VisionTransformer):
        raise ConfigError([f"layer-wise learning-rate decay needs a ViT encoder; this one is a "
                           f"{type(encoder).__name__} (leave the layer decay at 1)"])


def _optimizer_groups(model: Classifier, settings: FinetuneSettings) -> list[dict]:
    """AdamW groups with ``lr_scale``: no weight decay on biases and norms; with ``layer_decay`` < 1,
    timm's layer-wise scales over the ViT's patch embedding, blocks and final norm (the head at 1)."""
    if settings.layer_decay == 1.0:
        groups = param_groups(model)
        for g in groups:
            g["weight_decay"] = 0.0 if g["exempt"] else settings.weight_decay
        return groups
    check_layer_decay(model.encoder, settings)
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model.encoder, weight_decay=settings.weight_decay,
                                      layer_decay=settings.layer_decay)
    head = model.head
    return groups + [{"params": [head.weight], "weight_decay": settings.weight_decay, "lr_scale": 1.0},
                     {"params": [head.bias], "weight_decay": 0.0, "lr_scale": 1.0}]


@torch.no_grad()
def _probe_head(model: Classifier, train: ImageSet, mean: Sequence[float], std: Sequence[float], l2: float,
                device: torch.device) -> None:
    """Set the head to a logistic regression on standardised frozen features, the standardisation
    folded into its weights: W' = W / σ, b' = b − (μ / σ)·W."""
    feats = extract_features(model.encoder, train, mean, std, device, channels_last=_channels_last(train))
    mu, sigma = feats.mean(0), feats.std(0).clamp_min(1e-6)
    with torch.enable_grad():
        w, b = fit_logistic((feats - mu) / sigma, train.labels, model.head.out_features, l2)
    model.head.weight.copy_((w / sigma[:, None]).T)
    model.head.bias.copy_(b - (mu / sigma) @ w)


def classifier_accuracy(model: nn.Module, test: ImageSet, mean: Sequence[float], std: Sequence[float],
                        device: torch.device | str = "cpu") -> float:
    logits = extract_features(model, test, mean, std, device, channels_last=_channels_last(test))
    return float((logits.argmax(dim=1) == test.labels).float().mean()) if len(test) else float("nan")


def finetune_accuracy(encoder: nn.Module, num_features: int, train: ImageSet, test: ImageSet,
                      mean: Sequence[float], std: Sequence[float], settings: FinetuneSettings | None = None,
                      seed: int = 0, device: torch.device | str = "cpu") -> dict[str, float]:
    """Test accuracy of ``encoder`` fine-tuned on ``train`` (the encoder's weights change) and the seconds it took."""
    settings = settings or FinetuneSettings()
    t0 = time.perf_counter()
    model = train_classifier(encoder, num_features, train, mean, std, settings, seed, device)
    acc = classifier_accuracy(model, test, mean, std, device)
    return {"accuracy": acc, "time_s": time.perf_counter() - t0}
