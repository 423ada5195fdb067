"""Frozen features of an image set, computed in batches without augmentation.

Each batch is read with ``ImageSet.batch`` (a file-backed set is never loaded whole) and seen as
:func:`selfsup.views.center_view` shows it: for image-folder caches, whose records are whole images
squashed to squares, the centre square in the original pixel space at the set's ``image_size``;
for in-memory datasets, the images themselves.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.data.clips import ClipSet, is_clips
from selfsup.data.imageset import ImageSet
from selfsup.views import center_view, normalize
from selfsup.views.clips import center_clip


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block, its train/eval mode restored after (also on errors)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.inference_mode()
def extract_features(model: nn.Module, images: ImageSet, mean: Sequence[float], std: Sequence[float],
                     device: torch.device | str = "cpu", batch_size: int = 512,
                     channels_last: bool = True) -> Tensor:
    """(N, D) float32 features on the CPU; the model runs in eval mode and is restored afterwards.

    Channels-last is the faster layout for convolutions on both oneDNN (CPU) and cuDNN; the model's
    weights are converted for the call when needed (a no-op for non-convolutional models).
    """
    channels_last = channels_last and not is_clips(images)  # torch's channels_last is for 4-D tensors
    if channels_last:
        # outside inference mode: converted weights made in it could never be trained again
        with torch.inference_mode(False):
            model.to(memory_format=torch.channels_last)
    out = []
    with eval_mode(model):
        for x in eval_batches(images, device, batch_size):
            x = normalize(x, mean, std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(model(x).float().cpu())
    if not out:
        return torch.zeros(0, getattr(model, "num_features", 0))
    return torch.cat(out)


def eval_batches(images: ImageSet | ClipSet, device: torch.device | str = "cpu", batch_size: int = 512) -> Iterator[Tensor]:
    """Float (B, C, image_size, image_size) evaluation views in [0, 1], in order, on ``device``; for a clip set,
    clips (B, C, T, image_size, image_size) as its ``eval_clip`` and ``eval_frames`` say."""
    for start in range(0, len(images), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(images)))
        # the crop moves the aspect ratios to the images' device itself
        x = images.batch(idx).to(device, non_blocking=True)
        if is_clips(images):
            yield center_clip(x, images.aspect_at(idx), images.image_size, *images.eval_clip, images.channels,
                              images.eval_frames)
        else:
            yield center_view(x, images.aspect_at(idx), images.image_size)


def eval_images(images: ImageSet, idx: Tensor | Sequence[int]) -> Tensor:
    """uint8 (B, C, image_size, image_size): the evaluation views of the images at ``idx``, for drawing
    (a file-backed folder's records are whole images squashed to S×S; this is what the encoder sees); for clips,
    strips (B, C, image_size, T·image_size) of the evaluation clip's frames."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    aspect = images.aspect_at(idx)
    x = images.batch(idx)
    if is_clips(images):  # a strip: the evaluation clip's frames side by side, (B, C, S, T·S)
        clip = center_clip(x, aspect, images.image_size, *images.eval_clip, images.channels, images.eval_frames)
        return clip.permute(0, 1, 3, 2, 4).flatten(3).mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    if aspect is None and x.shape[-1] == images.image_size:
        return x
    return center_view(x, aspect, images.image_size).mul_(255).round_().clamp_(0, 255).to(torch.uint8)


RAW_PIXELS_MAX_SIDE = 32
"""The raw-pixel baseline sees at most 32×32 (CIFAR's side; Fashion-MNIST's 28 px unchanged): its features are
float32 and held whole for kNN and the linear probe, so at full size a folder of 100,000 images at 224 px would
need 60 GB (3,072 values an RGB image: 1.2 GB)."""


def pixel_features(images: ImageSet, mean: Sequence[float], std: Sequence[float], batch_size: int = 4096) -> Tensor:
    """Raw-pixel baseline: the normalised evaluation view, area-averaged down to at most
    :data:`RAW_PIXELS_MAX_SIDE` a side, flattened (N, C·side²)."""
    side = min(images.image_size, RAW_PIXELS_MAX_SIDE)

    def flat(x: Tensor) -> Tensor:
        x = x.flatten(1, 2) if x.ndim == 5 else x  # a clip's frames side by side as channels
        if x.shape[-1] != side:
            x = F.interpolate(x, size=(side, side), mode="area")
        return normalize(x, list(mean) * (x.shape[1] // len(mean)), list(std) * (x.shape[1] // len(mean))).flatten(1)

    chunks = [flat(x) for x in eval_batches(images, "cpu", batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, images.channels * side**2)
