"""Jigsaw puzzles: which of a fixed set of permutations shuffled the 3×3 tiles of an image?

Noroozi & Favaro. Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles.
ECCV 2016, arXiv:1603.09246.

The paper's context-free network: every tile goes through the shared encoder on its own (here all
B·9 tiles in one backbone call), a shared per-tile layer (fc6), then the tile features are concatenated
in puzzle order and an MLP (fc7, fc8) classifies the permutation. Tiles are cut with a random gap
inside their grid cell (geometry in :mod:`selfsup.views.tiles`) and normalised one by one, so
neither edges nor shared low-level statistics solve the puzzle. Permutations: a fixed max-min
Hamming set (``selfsup.views.tiles.permutation_set``; the paper compares set sizes and uses 1000,
we default to 100 for small data).
For 28×28 views: 9 px cells, 7 px tiles (gap 2), optionally resized (``tile_size``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.registry import register
from selfsup.nn.heads import mlp
from selfsup.views import Augment, ViewRecipe
from selfsup.views.tiles import check_grid, cut_tiles, normalize_tiles, permutation_set, shuffle_tiles, tile_batch


@register("jigsaw", "pretext", "Noroozi & Favaro 2016, Unsupervised Learning of Visual Representations by Solving "
          "Jigsaw Puzzles, arXiv:1603.09246")
class Jigsaw(nn.Module):
    spec = MethodSpec(
        views=ViewRecipe(globals_=(Augment(scale=(0.6, 1.0), gray_p=0.3, blur_p=0.0),)),
        test_params={"num_permutations": 10, "gap": 1},
        micro_batches="per_sample",  # a mean of per-sample terms
    )

    def __init__(self, backbone: nn.Module, *, grid: int = 3, gap: int = 2, tile_size: int | None = None,
                 num_permutations: int = 100, permutation_seed: int = 0, tile_dim: int = 128, hidden: int = 512,
                 tile_norm: bool = True):
        super().__init__()
        if grid not in (2, 3):
            raise ValueError(f"jigsaw: grid must be 2 or 3 (permutation sets enumerate all (grid²)! orders), got {grid}")
        if gap < 0:
            raise ValueError(f"jigsaw: gap must be ≥ 0 pixels, got {gap}")
        if tile_size is not None and tile_size < 2:
            raise ValueError(f"jigsaw: tile_size must be ≥ 2 pixels (or null to keep the cut size), got {tile_size}")
        if min(tile_dim, hidden) < 1:
            raise ValueError(f"jigsaw: tile_dim and hidden must be ≥ 1, got {tile_dim}, {hidden}")
        perms = permutation_set(num_permutations, grid * grid, permutation_seed)  # raises for impossible sizes
        self.backbone = backbone
        self.grid, self.gap, self.tile_size, self.tile_norm = grid, gap, tile_size, tile_norm
        self.register_buffer("perms", perms, persistent=False)  # rebuilt from the seed, never loaded
        self.tile_fc = nn.Sequential(nn.Linear(backbone.num_features, tile_dim), nn.ReLU())
        self.classifier = mlp([grid * grid * tile_dim, hidden, num_permutations], norm="bn")

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def check_run(self, n_train: int, batch_size: int, recipe: ViewRecipe) -> list[str]:
        problems = check_grid(recipe.globals_[0].size, self.grid, self.gap, who="views")
        return problems

    def puzzles(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Shuffled tiles (B, n, C, t, t) and their permutation index (B,) into ``self.perms``."""
        tiles, _ = cut_tiles(x, self.grid, self.gap)
        labels = torch.randint(len(self.perms), (x.shape[0],), device=x.device)
        return shuffle_tiles(tiles, self.perms[labels]), labels

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        x = views[0]
        b = x.shape[0]
        shuffled, labels = self.puzzles(x)
        if self.tile_norm:
            shuffled = normalize_tiles(shuffled)
        feats = self.backbone(tile_batch(shuffled, self.tile_size))  # (B·n, D): every tile, one call
        logits = self.classifier(self.tile_fc(feats).view(b, -1))
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        return loss, {"pretext_acc": acc.detach(), "z": feats.view(b, self.grid ** 2, -1).mean(dim=1).detach()}
