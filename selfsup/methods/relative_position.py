"""Relative patch position (context prediction): where does a patch lie around the centre patch?

Doersch, Gupta, Efros. Unsupervised Visual Representation Learning by Context Prediction.
ICCV 2015, arXiv:1505.05192.

From a 3×3 grid of tiles cut with a gap and random jitter (§3, geometry in
:mod:`selfsup.views.tiles`) the centre tile and one of its 8 neighbours go through the shared
encoder (all 2B patches in one call) and a shared per-patch layer (fc6); the two patch features are
concatenated and an MLP (fc7, fc8) predicts which of the 8 neighbours it was. Chromatic-aberration
guard (§3.1): on colour input each patch keeps one random colour channel and the other two are
replaced by Gaussian noise of 1/100 of the kept channel's std ("colour dropping"); one-channel input
has no colour to exploit and is left as is. For 28×28 views: 9 px cells, 7 px patches, gap 2
(adjacent patches 0–4 px apart; the paper's 96 px patches leave 48 px gaps plus 7 px jitter).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.registry import register
from selfsup.nn.heads import mlp
from selfsup.views import Augment, ViewRecipe
from selfsup.views.tiles import check_grid, cut_tiles, tile_batch

GRID, CENTRE = 3, 4
NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)
"""Label k ↔ row-major grid index NEIGHBOURS[k]: offset (k_row − 1, k_col − 1) from the centre."""


def neighbour_offset(label: int) -> tuple[int, int]:
    """(dy, dx) in cells from the centre patch to the neighbour with this label."""
    idx = NEIGHBOURS[label]
    return idx // GRID - 1, idx % GRID - 1


def patch_pairs(tiles: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Centre patches (B, C, t, t), one random neighbour of each (B, C, t, t) and its label (B,)."""
    b = tiles.shape[0]
    labels = torch.randint(len(NEIGHBOURS), (b,), device=tiles.device)
    grid_index = torch.tensor(NEIGHBOURS, device=tiles.device)[labels]
    return tiles[:, CENTRE], tiles[torch.arange(b, device=tiles.device), grid_index], labels


def drop_colours(patches: Tensor, noise: float = 0.01) -> Tensor:
    """Keep one random colour channel per patch, replace the others by noise of ``noise``× its std.

    patches: (N, C, t, t); a no-op when C == 1.
    """
    n, c = patches.shape[:2]
    if c == 1:
        return patches
    keep = torch.randint(c, (n,), device=patches.device)
    kept = patches[torch.arange(n, device=patches.device), keep]  # (N, t, t)
    std = kept.flatten(1).std(dim=1).view(n, 1, 1, 1)
    out = torch.randn_like(patches) * noise * std
    mask = F.one_hot(keep, c).to(torch.bool).view(n, c, 1, 1)
    return torch.where(mask, patches, out)


@register("relative_position", "pretext", "Doersch et al. 2015, Unsupervised Visual Representation Learning by "
          "Context Prediction, arXiv:1505.05192")
class RelativePosition(nn.Module):
    spec = MethodSpec(
        views=ViewRecipe(globals_=(Augment(scale=(0.6, 1.0), gray_p=0.0, blur_p=0.0),)),
        test_params={"gap": 1},
        micro_batches="per_sample",  # a mean of per-sample terms
    )

    def __init__(self, backbone: nn.Module, *, gap: int = 2, tile_size: int | None = None, patch_dim: int = 128,
                 hidden: int = 512, colour_drop: bool = True):
        super().__init__()
        if gap < 0:
            raise ValueError(f"relative_position: gap must be ≥ 0 pixels, got {gap}")
        if tile_size is not None and tile_size < 2:
            raise ValueError(f"relative_position: tile_size must be ≥ 2 pixels (or null), got {tile_size}")
        if min(patch_dim, hidden) < 1:
            raise ValueError(f"relative_position: patch_dim and hidden must be ≥ 1, got {patch_dim}, {hidden}")
        self.backbone = backbone
        self.gap, self.tile_size, self.colour_drop = gap, tile_size, colour_drop
        self.patch_fc = nn.Sequential(nn.Linear(backbone.num_features, patch_dim), nn.ReLU())
        self.classifier = mlp([2 * patch_dim, hidden, len(NEIGHBOURS)], norm="bn")

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def check_run(self, n_train: int, batch_size: int, recipe: ViewRecipe) -> list[str]:
        problems = check_grid(recipe.globals_[0].size, GRID, self.gap, who="views")
        return problems

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        x = views[0]
        b = x.shape[0]
        tiles, _ = cut_tiles(x, GRID, self.gap)
        centre, neighbour, labels = patch_pairs(tiles)
        patches = torch.stack([centre, neighbour], dim=1)  # (B, 2, C, t, t)
        if self.colour_drop:
            patches = drop_colours(patches.flatten(0, 1)).view_as(patches)
        feats = self.backbone(tile_batch(patches, self.tile_size))  # (2B, D), centre/neighbour interleaved
        logits = self.classifier(self.patch_fc(feats).view(b, -1))
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        return loss, {"pretext_acc": acc.detach(), "z": feats.view(b, 2, -1)[:, 0].detach()}
