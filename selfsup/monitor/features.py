"""Frozen features of an image set, computed in batches without augmentation."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from selfsup.data.imageset import ImageSet
from selfsup.views import normalize, to_float


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
    if channels_last:
        # outside inference mode: converted weights made in it could never be trained again
        with torch.inference_mode(False):
            model.to(memory_format=torch.channels_last)
    out = []
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            x = normalize(to_float(images.images[start : start + batch_size].to(device, non_blocking=True)), mean, std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(model(x).float().cpu())
    if not out:
        return torch.zeros(0, getattr(model, "num_features", 0))
    return torch.cat(out)


def pixel_features(images: ImageSet, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Raw-pixel baseline: the normalised image, flattened."""
    return normalize(to_float(images.images), mean, std).flatten(1)
