"""DCL: SimCLR with the decoupled contrastive loss (the positive pair left out of the denominator).

Yeh, Hong, Hsu, Liu, Chen, LeCun. Decoupled Contrastive Learning, ECCV 2022, arXiv:2110.06848 (eq. 6).

Removing the positive from NT-Xent's denominator removes the negative–positive coupling factor that
shrinks the gradient for easy positives and small batches (§3.1), so DCL needs neither large batches
nor a momentum encoder. Architecture and views are SimCLR's (arXiv:2002.05709: 2-layer MLP projector
with BN, hidden 2048, output 128); τ = 0.1 as in the paper's and lightly's DCL setting.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.losses.contrastive import dcl_loss
from selfsup.methods.base import Progress
from selfsup.methods.registry import register
from selfsup.nn.heads import mlp
from selfsup.views import Augment, ViewRecipe


@register("dcl", "contrastive", "Yeh et al. 2022, Decoupled Contrastive Learning, arXiv:2110.06848")
class DCL(nn.Module):
    views = ViewRecipe(globals_=(Augment(), Augment()))
    min_batch_size = 2

    def __init__(self, backbone: nn.Module, *, temperature: float = 0.1, proj_hidden: int = 2048,
                 proj_dim: int = 128, proj_layers: int = 2, gather: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"{self.method_name}: temperature must be > 0, got {temperature}")
        if proj_layers < 1:
            raise ValueError(f"{self.method_name}: proj_layers must be ≥ 1, got {proj_layers}")
        self.backbone = backbone
        dims = [backbone.num_features] + [proj_hidden] * (proj_layers - 1) + [proj_dim]
        self.projector = mlp(dims, norm="bn")
        self.temperature = temperature
        self.gather = gather

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        return dcl_loss(z1, z2, self.temperature, gather=self.gather)

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        x1, x2 = views
        z1, z2 = self.projector(self.backbone(torch.cat([x1, x2]))).chunk(2)  # both views in one pass
        return self.loss(z1, z2), {"z": z1.detach(), "z_pair": z2.detach()}

    def check_run(self, n_train: int, batch_size: int, recipe: ViewRecipe) -> list[str]:
        if recipe.num_views != 2:
            return [f"{self.method_name} uses exactly 2 views, the view recipe makes {recipe.num_views}"]
        return []
