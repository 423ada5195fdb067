"""NNCLR: the positive of a view is the nearest neighbour of its projection in a support set of past ones.

Dwibedi, Aytar, Tompson, Sermanet, Zisserman. With a Little Help from My Friends: Nearest-Neighbor
Contrastive Learning of Visual Representations, ICCV 2021, arXiv:2104.14548 (eq. 2, §3–4).

``L_i = −log exp(NN(z1_i)·p2_i/τ) / Σ_k exp(NN(z1_i)·p2_k/τ)``, symmetrised over the two views, where
NN(z) is the nearest neighbour (cosine) of projection z in the support set Q and p the predictor
output. The lookup carries no gradient; this batch's view-1 projections join Q after the step. While
Q is still empty (the first step) a view's own projection stands in for its neighbour.

Defaults follow the paper: projector 3 layers (hidden 2048, output 256, BN after each, the last one
affine-free here), predictor 2 layers (hidden 4096), τ = 0.1, support set 98304 (scale it to the data:
``check_run`` refuses one larger than the training set). BYOL's augmentations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.losses.contrastive import info_nce
from selfsup.methods.base import MethodSpec, Progress, step_from_embeddings
from selfsup.methods.registry import register
from selfsup.nn.heads import mlp
from selfsup.nn.queue import MemoryQueue
from selfsup.distributed import gather_no_grad
from selfsup.views import ViewRecipe, byol_pair


@register("nnclr", "contrastive", "Dwibedi et al. 2021, Nearest-Neighbor Contrastive Learning, arXiv:2104.14548")
class NNCLR(nn.Module):
    spec = MethodSpec(
        views=byol_pair(),
        test_params={"support_size": 40, "proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32},
        micro_batches="embeddings",
    )

    def __init__(self, backbone: nn.Module, *, temperature: float = 0.1, support_size: int = 98304,
                 proj_hidden: int = 2048, proj_dim: int = 256, proj_layers: int = 3, pred_hidden: int = 4096,
                 gather: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"nnclr: temperature must be > 0, got {temperature}")
        if support_size < 1:
            raise ValueError(f"nnclr: support_size must be ≥ 1, got {support_size}")
        if proj_layers < 1:
            raise ValueError(f"nnclr: proj_layers must be ≥ 1, got {proj_layers}")
        self.backbone = backbone
        dims = [backbone.num_features] + [proj_hidden] * (proj_layers - 1) + [proj_dim]
        self.projector = mlp(dims, norm="bn", last_norm=True)
        self.predictor = mlp([proj_dim, pred_hidden, proj_dim], norm="bn")
        self.support = MemoryQueue(support_size, proj_dim)
        self.temperature = temperature
        self.gather = gather

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    @torch.no_grad()
    def nearest(self, z: Tensor) -> Tensor:
        """(B, D) → (B, D): each row's cosine nearest neighbour in the support set (itself while it is empty)."""
        z = F.normalize(z.detach().float(), dim=1)
        support = self.support.contents()
        if support.shape[0] == 0:
            return z
        return support[(z @ support.T).argmax(dim=1)]

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        return step_from_embeddings(self, views, progress)

    def embed(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """Projections ``z1``, ``z2`` and predictions ``p1``, ``p2`` (B, proj_dim) of the two views."""
        x1, x2 = views
        z1, z2 = self.projector(self.backbone(torch.cat([x1, x2]))).chunk(2)
        p1, p2 = self.predictor(torch.cat([z1, z2])).chunk(2)
        return {"z1": z1, "z2": z2, "p1": p1, "p2": p2}

    def loss_from(self, emb: dict[str, Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        z1, z2 = emb["z1"], emb["z2"]
        nn1, nn2 = self.nearest(z1), self.nearest(z2)
        loss = 0.5 * (info_nce(nn1, emb["p2"], self.temperature, gather=self.gather)
                      + info_nce(nn2, emb["p1"], self.temperature, gather=self.gather))
        # this step's view-1 projections join the support set in after_step, once the step is taken
        return loss, {"z": z1.detach(), "z_pair": z2.detach(), "support_rows": F.normalize(z1.detach().float(), dim=1)}

    def after_step(self, progress: Progress, logs: dict[str, Tensor]) -> None:
        rows = logs["support_rows"]
        self.support.push(gather_no_grad(rows) if self.gather else rows)

    def check_run(self, n_train: int, batch_size: int, recipe: ViewRecipe) -> list[str]:
        problems = []
        if self.support.size > n_train:
            problems.append(f"the support set ({self.support.size} rows) is larger than the {n_train} training "
                            f"images, so neighbours would be stale copies of the same images; set "
                            f"method.params.support_size ≤ {n_train}")
        return problems
