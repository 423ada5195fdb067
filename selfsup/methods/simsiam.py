"""SimSiam: a Siamese network whose predictor chases the other view's projection under a stop-gradient.

Chen & He. Exploring Simple Siamese Representation Learning. CVPR 2021, arXiv:2011.10566.

Defaults follow the paper (§3, §4.2): a 3-layer projector with BN on every layer including the output
(2048 wide), a bottleneck predictor 2048 → 512 → 2048 with no BN on its output, the symmetric loss
``½·D(p₁, sg(z₂)) + ½·D(p₂, sg(z₁))`` with ``D = −cos``, and a predictor trained at the fixed base
learning rate (no cosine decay, table 1c). There is no EMA: the target is the same network, detached.

``stop_gradient=False`` or ``predictor=False`` are the paper's collapse ablations (§4.1, fig. 2;
§4.2, table 1a): both make the representation collapse to a constant.
"""
from __future__ import annotations

from torch import Tensor, nn

from selfsup.losses.distillation import negative_cosine
from selfsup.methods.base import MethodSpec, Progress, step_from_embeddings
from selfsup.methods.registry import register
from selfsup.nn.heads import mlp
from selfsup.views import Augment, ViewRecipe


@register("simsiam", "self-distillation", "Chen & He 2020, Exploring Simple Siamese Representation Learning, "
          "arXiv:2011.10566")
class SimSiam(nn.Module):
    spec = MethodSpec(
        views=ViewRecipe(globals_=(Augment(), Augment())),
        test_params={"proj_hidden": 32, "proj_dim": 32, "pred_hidden": 8},
        # a mean of per-sample terms: chunks accumulate without a second pass (embed/loss_from serve GradCache too)
        micro_batches="per_sample",
    )

    def __init__(self, backbone: nn.Module, *, proj_hidden: int = 2048, proj_dim: int = 2048, proj_layers: int = 3,
                 pred_hidden: int = 512, stop_gradient: bool = True, predictor: bool = True,
                 fixed_predictor_lr: bool = True):
        super().__init__()
        if proj_layers < 1:
            raise ValueError(f"simsiam: proj_layers must be ≥ 1, got {proj_layers}")
        if min(proj_hidden, proj_dim, pred_hidden) < 1:
            raise ValueError(f"simsiam: head widths must be ≥ 1, got {proj_hidden}, {proj_dim}, {pred_hidden}")
        self.backbone = backbone
        dims = [backbone.num_features] + [proj_hidden] * (proj_layers - 1) + [proj_dim]
        # An affine-free BN on the output layer, as the paper's "BN applied to each fc layer including its output".
        self.projector = mlp(dims, norm="bn", last_norm=True)
        self.predictor = mlp([proj_dim, pred_hidden, proj_dim], norm="bn") if predictor else nn.Identity()
        self.stop_gradient = stop_gradient
        self.fixed_predictor_lr = fixed_predictor_lr

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        return step_from_embeddings(self, views, progress)

    def embed(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """Projections ``z1``, ``z2`` and predictions ``p1``, ``p2`` (B, proj_dim) of the two views."""
        # One view at a time through the network, so BatchNorm statistics are per view as in Algorithm 1.
        z = [self.projector(self.backbone(v)) for v in views]
        p = [self.predictor(zi) for zi in z]
        return {"z1": z[0], "z2": z[1], "p1": p[0], "p2": p[1]}

    def loss_from(self, emb: dict[str, Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        z = [emb["z1"], emb["z2"]]
        p = [emb["p1"], emb["p2"]]
        target = [zi.detach() for zi in z] if self.stop_gradient else z
        loss = 0.5 * negative_cosine(p[0], target[1]) + 0.5 * negative_cosine(p[1], target[0])
        return loss, {"z": z[0].detach(), "z_pair": z[1].detach()}

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.predictor.parameters()), "fixed_lr": self.fixed_predictor_lr}]
