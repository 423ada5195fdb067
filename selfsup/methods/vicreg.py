"""VICReg: variance–invariance–covariance regularisation of two views' embeddings.

Bardes, Ponce, LeCun. VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
Learning. ICLR 2022, arXiv:2105.04906.

Paper defaults: a 3-layer expander (Linear–BN–ReLU twice, then Linear) of width 8192, loss
weights λ = 25 (invariance), μ = 25 (variance), ν = 1 (covariance), γ = 1, ε = 10⁻⁴, LARS with
lr 0.2 × B/256 and weight decay 10⁻⁶, the BYOL augmentations. The expander width is a
constructor parameter; CPU recipes scale it down.
"""
from __future__ import annotations

from torch import Tensor, nn

from selfsup.losses.redundancy import check_vicreg_settings, vicreg_loss
from selfsup.methods.base import MethodSpec, Progress, step_from_embeddings
from selfsup.methods.registry import register
from selfsup.nn.heads import mlp
from selfsup.views import byol_pair

# BYOL's pair of view pipelines (arXiv:2006.07733), which VICReg adopts.
@register("vicreg", "redundancy-reduction",
          "Bardes et al. 2022, VICReg: Variance-Invariance-Covariance Regularization, arXiv:2105.04906")
class VICReg(nn.Module):
    spec = MethodSpec(
        views=byol_pair(saturation=0.2),
        test_params={"proj_hidden": 64, "proj_dim": 64},
        micro_batches="embeddings",
    )

    def __init__(self, backbone: nn.Module, *, sim_weight: float = 25.0, var_weight: float = 25.0,
                 cov_weight: float = 1.0, gamma: float = 1.0, eps: float = 1e-4, proj_hidden: int = 8192,
                 proj_dim: int = 8192, proj_layers: int = 3, gather: bool = False):
        super().__init__()
        check_vicreg_settings(sim_weight, var_weight, cov_weight, gamma, eps)
        if proj_layers < 1:
            raise ValueError(f"vicreg: proj_layers must be ≥ 1, got {proj_layers}")
        if min(proj_hidden, proj_dim) < 1:
            raise ValueError(f"vicreg: expander widths must be ≥ 1, got {proj_hidden} and {proj_dim}")
        self.backbone = backbone
        dims = [backbone.num_features] + [proj_hidden] * (proj_layers - 1) + [proj_dim]
        self.expander = mlp(dims, norm="bn", last_bias=False)
        self.weights = dict(sim_weight=sim_weight, var_weight=var_weight, cov_weight=cov_weight)
        self.gamma, self.eps = gamma, eps
        self.gather = gather

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        return step_from_embeddings(self, views, progress)

    def embed(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """The two views' expander outputs ``z1``, ``z2`` (B, proj_dim)."""
        x1, x2 = views
        # One pass per view, as the reference code: BatchNorm statistics are those of one view.
        return {"z1": self.expander(self.backbone(x1)), "z2": self.expander(self.backbone(x2))}

    def loss_from(self, emb: dict[str, Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        z1, z2 = emb["z1"], emb["z2"]
        loss, terms = vicreg_loss(z1, z2, **self.weights, gamma=self.gamma, eps=self.eps,  # fp32 inside
                                  gather=self.gather)
        return loss, {**terms, "z": z1.detach(), "z_pair": z2.detach()}
