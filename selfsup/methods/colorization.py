"""Colorization: predict an image's colour from its luminance.

Zhang, Isola, Efros. Colorful Image Colorization. ECCV 2016, arXiv:1603.08511.

Variant: *regression* of the two colour-difference (chroma) channels of a YUV split at low resolution
(the paper's §2.1 baseline loss; its main model classifies quantised ab with class rebalancing instead,
which fits a dense decoder better than the pooled features used here). The split is made in the
per-channel standardised colour space the backbone sees, so it needs no dataset statistics:
Y = 0.299·R + 0.587·G + 0.114·B, U = B − Y, V = R − Y on the normalised channels; it is exactly
invertible (:func:`merge_chroma`) and Y is a single grey channel, so no colour leaks into the input.

Input choice: the backbone sees Y replicated to its 3 input channels (Y, Y, Y), so the same backbone
takes RGB images at evaluation time. The decoder maps the pooled features (B, D) through an MLP to a
``out_size``×``out_size`` chroma map, compared by MSE with the area-averaged target: with a pooled
backbone it learns the coarse colour layout, not pixel-accurate colour.
Colour input is required: on one-channel data the constructor refuses before training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.registry import register
from selfsup.nn.heads import mlp
from selfsup.views import Augment, ViewRecipe

LUMA = (0.299, 0.587, 0.114)


def split_chroma(x: Tensor) -> tuple[Tensor, Tensor]:
    """RGB (B, 3, H, W) → luminance Y (B, 1, H, W) and chroma (U, V) = (B − Y, R − Y): (B, 2, H, W)."""
    y = LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]
    return y, torch.cat([x[:, 2:3] - y, x[:, 0:1] - y], dim=1)


def merge_chroma(y: Tensor, uv: Tensor) -> Tensor:
    """Inverse of :func:`split_chroma`: G follows from Y = 0.299·R + 0.587·G + 0.114·B."""
    u, v = uv[:, 0:1], uv[:, 1:2]
    r, b = y + v, y + u
    g = y - (LUMA[0] * v + LUMA[2] * u) / LUMA[1]
    return torch.cat([r, g, b], dim=1)


def input_channels(backbone: nn.Module) -> int | None:
    """Channels the backbone's first convolution (or patch embedding) takes; None if it has none."""
    first = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first is None else first.in_channels


@register("colorization", "pretext", "Zhang et al. 2016, Colorful Image Colorization, arXiv:1603.08511")
class Colorization(nn.Module):
    spec = MethodSpec(
        views=ViewRecipe(globals_=(Augment(scale=(0.5, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0),)),
        pictures=("colorization",),
        test_params={"out_size": 4, "hidden": 64},
        test_in_chans=3,
        micro_batches="per_sample",  # a mean of per-sample terms
    )

    def __init__(self, backbone: nn.Module, *, out_size: int = 8, hidden: int = 512):
        super().__init__()
        chans = input_channels(backbone)
        if chans is not None and chans != 3:
            raise ValueError(f"colorization needs colour images (3 channels); the data has {chans} channel"
                             f"{'s' if chans != 1 else ''} — use an RGB dataset such as sample-photos, CIFAR "
                             "batches (--data DIR) or an image folder")
        if out_size < 1 or hidden < 1:
            raise ValueError(f"colorization: out_size and hidden must be ≥ 1, got {out_size}, {hidden}")
        self.backbone = backbone
        self.out_size = out_size
        self.decoder = mlp([backbone.num_features, hidden, 2 * out_size * out_size], norm="bn")

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def check_run(self, n_train: int, batch_size: int, recipe: ViewRecipe) -> list[str]:
        problems = []
        if recipe.globals_[0].size < self.out_size:
            problems.append(f"out_size {self.out_size} is larger than the {recipe.globals_[0].size} px views")
        return problems

    def predict_chroma(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Luminance (B, 1, H, W) → low-resolution chroma (B, 2, out_size, out_size) and features (B, D)."""
        feats = self.backbone(y.expand(-1, 3, -1, -1).contiguous())
        return self.decoder(feats).view(-1, 2, self.out_size, self.out_size), feats

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        x = views[0]
        if x.shape[1] != 3:
            raise ValueError(f"colorization needs colour images (3 channels), got {x.shape[1]}")
        y, uv = split_chroma(x)
        target = F.adaptive_avg_pool2d(uv, self.out_size)
        pred, feats = self.predict_chroma(y)
        loss = F.mse_loss(pred, target)
        # R² against predicting the batch-mean chroma map: 0 = no better than one colour layout for all, 1 = exact.
        baseline = (target - target.mean(dim=0, keepdim=True)).pow(2).mean().clamp_min(1e-12)
        return loss, {"chroma_mse": loss.detach(), "pretext_r2": (1 - loss / baseline).detach(),
                      "z": feats.detach()}
