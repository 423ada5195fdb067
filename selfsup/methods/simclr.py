"""SimCLR: contrast two augmented views of each image against every other view in the batch.

Chen, Kornblith, Norouzi, Hinton. A Simple Framework for Contrastive Learning of Visual
Representations. ICML 2020, arXiv:2002.05709.

Defaults follow the paper: a 2-layer MLP projector with BN (appendix B.9 uses hidden = feature
width, output 128), NT-Xent with τ = 0.5 (CIFAR-10 setting, table 5 / B.9), LARS, lr = 0.075·√B.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.losses.contrastive import nt_xent
from selfsup.methods.base import MethodSpec, Progress, step_from_embeddings
from selfsup.methods.registry import register
from selfsup.nn.heads import mlp
from selfsup.views import Augment, ViewRecipe


@register("simclr", "contrastive", "Chen et al. 2020, A Simple Framework for Contrastive Learning, arXiv:2002.05709")
class SimCLR(nn.Module):
    spec = MethodSpec(
        views=ViewRecipe(globals_=(Augment(), Augment())),
        micro_batches="embeddings",
    )

    def __init__(self, backbone: nn.Module, *, temperature: float = 0.5, proj_hidden: int = 2048,
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
        """The contrastive loss of the two views' projections (B, D); subclasses swap it (DCL)."""
        return nt_xent(z1, z2, self.temperature, gather=self.gather)

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        return step_from_embeddings(self, views, progress)

    def embed(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """The two views' projections ``z1``, ``z2`` (B, proj_dim)."""
        x1, x2 = views
        z = self.projector(self.backbone(torch.cat([x1, x2])))  # both views through the backbone together
        z1, z2 = z.chunk(2)
        return {"z1": z1, "z2": z2}

    def loss_from(self, emb: dict[str, Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        z1, z2 = emb["z1"], emb["z2"]
        return self.loss(z1, z2), {"z": z1.detach(), "z_pair": z2.detach()}
