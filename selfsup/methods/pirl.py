"""PIRL: the representation of an image should not change when its tiles are shuffled.

Misra & van der Maaten. Self-Supervised Learning of Pretext-Invariant Representations.
CVPR 2020, arXiv:1912.01991. Defaults from the paper and VISSL's ``pirl_jigsaw_4node_resnet50``.

Image branch f: backbone → linear → 128-d. Jigsaw branch g: nine tiles of another crop (cut with a gap,
:mod:`selfsup.views.tiles`) through the same backbone in one call → a shared linear per tile → the nine
tile embeddings concatenated in a random order per image → linear → 128-d. Memory bank: one l2-normalised
row m_I per training image, updated after each step as m_I ← normalise(0.5·m_I + 0.5·f(v_I)) (§3.2);
negatives are rows drawn uniformly from it. Loss :func:`~selfsup.losses.pretext.pirl_loss` (λ = 0.5,
τ = 0.07, InfoNCE form). The loop passes each batch's training-set indices (``needs_indices``).

Deviations, for short CPU budgets: a bank row is initialised with the image's own f(v_I) on its first
visit (the paper/VISSL start from random unit vectors, costing the first epoch when training for 800), and
negatives are drawn only from rows already visited; 4096 negatives by default (paper: 32000 of 1.28 M).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.losses.pretext import pirl_loss
from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.registry import register
from selfsup.distributed import world_size
from selfsup.nn.memory import IndexedMemory
from selfsup.views import Augment, ViewRecipe
from selfsup.views.tiles import check_grid, cut_tiles, shuffle_tiles, tile_batch

GRID = 3


@register("pirl", "contrastive", "Misra & van der Maaten 2019, Self-Supervised Learning of Pretext-Invariant "
          "Representations, arXiv:1912.01991")
class PIRL(nn.Module):
    spec = MethodSpec(
        views=ViewRecipe(globals_=(Augment(), Augment(scale=(0.6, 1.0)))),
        needs_indices=True,
        test_params={"gap": 1, "num_negatives": 64},
    )

    def __init__(self, backbone: nn.Module, *, temperature: float = 0.07, lam: float = 0.5,
                 bank_momentum: float = 0.5, num_negatives: int = 4096, proj_dim: int = 128, gap: int = 2,
                 tile_size: int | None = None):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"pirl: temperature must be > 0, got {temperature}")
        if not 0.0 <= lam <= 1.0 or not 0.0 <= bank_momentum <= 1.0:
            raise ValueError(f"pirl: lam and bank_momentum must be in [0, 1], got {lam} and {bank_momentum}")
        if num_negatives < 1 or proj_dim < 1 or gap < 0:
            raise ValueError(f"pirl: need num_negatives ≥ 1, proj_dim ≥ 1, gap ≥ 0; got {num_negatives}, "
                             f"{proj_dim}, {gap}")
        self.backbone = backbone
        d = backbone.num_features
        self.f = nn.Linear(d, proj_dim)  # image branch
        self.tile_proj = nn.Linear(d, proj_dim)  # h: shared per tile
        self.g = nn.Linear(GRID * GRID * proj_dim, proj_dim)  # jigsaw branch on the shuffled concatenation
        self.temperature, self.lam, self.bank_momentum = temperature, lam, bank_momentum
        self.num_negatives, self.gap, self.tile_size = num_negatives, gap, tile_size
        self.bank = IndexedMemory(proj_dim)  # m_I, one l2-normalised row per training image

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def check_run(self, n_train: int, batch_size: int, recipe: ViewRecipe) -> list[str]:
        problems = check_grid(recipe.globals_[-1].size, GRID, self.gap, who="views")
        if world_size() > 1:
            problems.append("the memory bank is per process; run on one process")
        return problems

    def jigsaw_embedding(self, x: Tensor) -> Tensor:
        """g(v_{I^t}): (B, C, S, S) → (B, proj_dim), tile embeddings concatenated in a random order."""
        b = x.shape[0]
        tiles, _ = cut_tiles(x, GRID, self.gap)
        h = self.tile_proj(self.backbone(tile_batch(tiles, self.tile_size))).view(b, GRID * GRID, -1)
        order = torch.rand(b, GRID * GRID, device=x.device).argsort(dim=1)
        return self.g(shuffle_tiles(h, order).flatten(1))

    def training_step(self, views: list[Tensor], progress: Progress,
                      indices: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        image, source = views
        b = image.shape[0]
        f = self.f(self.backbone(image))
        g = self.jigsaw_embedding(source)
        # Without indices (a call outside the loop) the batch stands in for the whole training set.
        idx = (torch.arange(b) if indices is None else indices).to(self.bank.rows.device)
        with torch.no_grad():
            f_unit = F.normalize(f.detach().float(), dim=1)
            self.bank.grow(int(idx.max()) + 1)
            new = ~self.bank.filled[idx]
            self.bank.write(idx[new], f_unit[new])  # first visit: the image's own embedding
            memory = self.bank.read(idx)
            visited = self.bank.filled_indices()
            negatives = self.bank.rows[visited[torch.randint(len(visited), (self.num_negatives,), device=idx.device)]]
        loss = pirl_loss(f, g, memory.to(f.dtype), negatives.to(f.dtype), self.temperature, self.lam)
        with torch.no_grad():
            m = self.bank_momentum
            self.bank.write(idx, F.normalize(m * memory + (1 - m) * f_unit, dim=1))
        return loss, {"z": f.detach(), "z_pair": g.detach(), "new_rows": new.float().mean()}
