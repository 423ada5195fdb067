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
from selfsup.methods.base import Progress
from selfsup.methods.registry import register
from selfsup.distributed import world_size
from selfsup.views import Augment, ViewRecipe
from selfsup.views.tiles import check_grid, cut_tiles, shuffle_tiles, tile_batch

GRID = 3


@register("pirl", "contrastive", "Misra & van der Maaten 2019, Self-Supervised Learning of Pretext-Invariant "
          "Representations, arXiv:1912.01991")
class PIRL(nn.Module):
    views = ViewRecipe(globals_=(Augment(), Augment(scale=(0.6, 1.0))))
    min_batch_size = 2
    needs_indices = True
    """The loop passes ``indices=`` (B,): the batch's positions in the training set, the memory-bank keys."""
    test_params = {"gap": 1, "num_negatives": 64}

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
        # Sized by the largest sample index seen, so the method needs no dataset size at construction.
        self.register_buffer("bank", torch.zeros(0, proj_dim))
        self.register_buffer("filled", torch.zeros(0, dtype=torch.bool))

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

    @torch.no_grad()
    def _grow(self, n: int) -> None:
        if n > self.bank.shape[0]:
            extra = n - self.bank.shape[0]
            self.bank = torch.cat([self.bank, self.bank.new_zeros(extra, self.bank.shape[1])])
            self.filled = torch.cat([self.filled, self.filled.new_zeros(extra)])

    def training_step(self, views: list[Tensor], progress: Progress,
                      indices: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        image, source = views
        b = image.shape[0]
        f = self.f(self.backbone(image))
        g = self.jigsaw_embedding(source)
        # Without indices (a call outside the loop) the batch stands in for the whole training set.
        idx = (torch.arange(b) if indices is None else indices).to(self.bank.device)
        with torch.no_grad():
            f_unit = F.normalize(f.detach().float(), dim=1)
            self._grow(int(idx.max()) + 1)
            new = ~self.filled[idx]
            self.bank[idx[new]], self.filled[idx[new]] = f_unit[new], True
            memory = self.bank[idx].clone()
            visited = self.filled.nonzero().squeeze(1)
            negatives = self.bank[visited[torch.randint(len(visited), (self.num_negatives,), device=idx.device)]]
        loss = pirl_loss(f, g, memory.to(f.dtype), negatives.to(f.dtype), self.temperature, self.lam)
        with torch.no_grad():
            m = self.bank_momentum
            self.bank[idx] = F.normalize(m * memory + (1 - m) * f_unit, dim=1)
        return loss, {"z": f.detach(), "z_pair": g.detach(), "new_rows": new.float().mean()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The bank grows with the data, so a checkpoint's is larger than a fresh model's.
        for name in ("bank", "filled"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, getattr(self, name).new_zeros(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
