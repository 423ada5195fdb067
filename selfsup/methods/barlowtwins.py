"""Barlow Twins: make the cross-correlation of two views' embeddings the identity matrix.

Zbontar, Jing, Misra, LeCun, Deny. Barlow Twins: Self-Supervised Learning via Redundancy Reduction.
ICML 2021, arXiv:2103.03230.

Paper defaults: a 3-layer projector (Linear–BN–ReLU twice, then Linear) of width 8192, λ = 5·10⁻³,
LARS with lr 0.2 × B/256 for weights and 0.0048 × B/256 for biases and BN parameters
(``bias_lr_scale`` = 0.0048 / 0.2), the BYOL augmentations (asymmetric blur and solarisation).
The width is a constructor parameter: the paper's accuracy grows with it (fig. 4), CPU recipes
scale it down.
"""
from __future__ import annotations

from torch import Tensor, nn

from selfsup.losses.redundancy import barlow_twins_loss
from selfsup.methods.base import MethodSpec, Progress, step_from_embeddings
from selfsup.methods.registry import register
from selfsup.nn.heads import mlp
from selfsup.views import byol_pair

# BYOL's pair of view pipelines (arXiv:2006.07733), which Barlow Twins adopts.
@register("barlowtwins", "redundancy-reduction",
          "Zbontar et al. 2021, Barlow Twins: Self-Supervised Learning via Redundancy Reduction, arXiv:2103.03230")
class BarlowTwins(nn.Module):
    spec = MethodSpec(
        views=byol_pair(saturation=0.2),
        test_params={"proj_hidden": 64, "proj_dim": 64},
        micro_batches="embeddings",
    )

    def __init__(self, backbone: nn.Module, *, lambd: float = 5e-3, proj_hidden: int = 8192, proj_dim: int = 8192,
                 proj_layers: int = 3, bias_lr_scale: float = 0.024, gather: bool = False):
        super().__init__()
        if lambd < 0:
            raise ValueError(f"barlowtwins: lambd (the off-diagonal weight λ) must be ≥ 0, got {lambd}")
        if proj_layers < 1:
            raise ValueError(f"barlowtwins: proj_layers must be ≥ 1, got {proj_layers}")
        if min(proj_hidden, proj_dim) < 1:
            raise ValueError(f"barlowtwins: projector widths must be ≥ 1, got {proj_hidden} and {proj_dim}")
        if bias_lr_scale <= 0:
            raise ValueError(f"barlowtwins: bias_lr_scale must be > 0, got {bias_lr_scale}")
        self.backbone = backbone
        dims = [backbone.num_features] + [proj_hidden] * (proj_layers - 1) + [proj_dim]
        # No bias on the last layer: the loss standardises each dimension, which would cancel it.
        self.projector = mlp(dims, norm="bn", last_bias=False)
        self.lambd = lambd
        self.bias_lr_scale = bias_lr_scale
        self.gather = gather

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def param_groups(self) -> list[dict]:
        """Biases and BN parameters (every 1-D parameter) at the paper's lower rate (0.0048 vs 0.2)."""
        return [{"params": [p for p in self.parameters() if p.ndim <= 1], "lr_scale": self.bias_lr_scale}]

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        return step_from_embeddings(self, views, progress)

    def embed(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """The two views' projections ``z1``, ``z2`` (B, proj_dim)."""
        x1, x2 = views
        # One pass per view, as the reference code: BatchNorm statistics are those of one view.
        return {"z1": self.projector(self.backbone(x1)), "z2": self.projector(self.backbone(x2))}

    def loss_from(self, emb: dict[str, Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        z1, z2 = emb["z1"], emb["z2"]
        loss = barlow_twins_loss(z1, z2, self.lambd, gather=self.gather)  # fp32 inside, even under autocast
        return loss, {"z": z1.detach(), "z_pair": z2.detach()}
