"""Rotation prediction (RotNet): which of 0°, 90°, 180°, 270° was the image turned by?

Gidaris, Singh, Komodakis. Unsupervised Representation Learning by Predicting Image Rotations.
ICLR 2018, arXiv:1803.07728.

As in the paper (§3, table 2), every image of a batch is shown in all four rotations at once, so the
classifier sees the four versions of one image side by side. The classifier is a small MLP on the
pooled backbone features (the paper puts conv blocks of the network itself on top; with a pooled
backbone a 2-layer MLP head plays that role). Views: random crop and flip only (the paper's CIFAR
setting); colour jitter adds nothing a rotation label could use.

``rotations_per_image`` < 4 shows each image in that many of the four rotations, drawn at random per image
and step (without repeats), so a step costs r/4 of the paper's per image and an epoch of the same wall
time sees 4/r times as many crops. (On Fashion-MNIST, r = 2 for 6 epochs scored 0.5 below r = 4 for 3 on
the held-out linear probe: benchmarks/recipe_screen/.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.registry import register
from selfsup.nn.heads import mlp
from selfsup.views import Augment, ViewRecipe

ROTATIONS = 4


def rotate_all(x: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C, S, S) → (4B, C, S, S) rotated by k·90° counter-clockwise, with labels k: (4B,) int64.

    Block k of B rows is the batch rotated by k·90°; :func:`unrotate` inverts it given the labels.
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation needs square views, got {tuple(x.shape[-2:])}")
    rotated = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=x.device).repeat_interleave(x.shape[0])
    return rotated, labels


def rotate_each(x: Tensor, k: Tensor) -> Tensor:
    """(B, C, S, S) with image i turned by ``k[i]``·90° counter-clockwise (k: (B,) int64 in 0..3)."""
    rotated, _ = rotate_all(x)
    return rotated.view(ROTATIONS, *x.shape)[k, torch.arange(x.shape[0], device=x.device)]


def rotate_some(x: Tensor, per_image: int) -> tuple[Tensor, Tensor]:
    """(B, C, S, S) → (rB, C, S, S): each image in ``per_image`` = r distinct rotations drawn at random, labels (rB,).

    Block j of B rows holds every image in its j-th drawn rotation; r = 4 is :func:`rotate_all`.
    """
    if per_image == ROTATIONS:
        return rotate_all(x)
    k = torch.rand(x.shape[0], ROTATIONS, device=x.device).argsort(dim=1)[:, :per_image].T  # (r, B), distinct per image
    rotated = rotate_all(x)[0].view(ROTATIONS, *x.shape)  # the four rotations once, picked per block below
    return rotated[k, torch.arange(x.shape[0], device=x.device)].flatten(0, 1), k.reshape(-1)


def unrotate(x: Tensor, labels: Tensor) -> Tensor:
    """Undo a rotation by ``labels[i]``·90° on each image of (N, C, S, S)."""
    return torch.stack([torch.rot90(img, -int(k), dims=(-2, -1)) for img, k in zip(x, labels)])


@register("rotation", "pretext", "Gidaris et al. 2018, Unsupervised Representation Learning by Predicting Image "
          "Rotations, arXiv:1803.07728")
class RotationPrediction(nn.Module):
    spec = MethodSpec(
        views=ViewRecipe(globals_=(Augment(scale=(0.5, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0),)),
        micro_batches="per_sample",  # a mean of per-sample terms
    )

    def __init__(self, backbone: nn.Module, *, head_hidden: int = 512, rotations_per_image: int = ROTATIONS):
        super().__init__()
        if head_hidden < 1:
            raise ValueError(f"rotation: head_hidden must be ≥ 1, got {head_hidden}")
        if not 1 <= rotations_per_image <= ROTATIONS:
            raise ValueError(f"rotation: rotations_per_image must be 1–{ROTATIONS}, got {rotations_per_image}")
        self.rotations_per_image = rotations_per_image
        self.backbone = backbone
        self.classifier = mlp([backbone.num_features, head_hidden, ROTATIONS], norm="bn")

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        x = views[0]
        rotated, labels = rotate_some(x, self.rotations_per_image)
        feats = self.backbone(rotated)  # every rotation of the batch through the backbone together
        logits = self.classifier(feats)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        return loss, {"pretext_acc": acc.detach(), "z": feats[: x.shape[0]].detach()}
