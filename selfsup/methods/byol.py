"""BYOL: an online network predicts the projection an EMA target network gives another view.

Grill et al. Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning. NeurIPS 2020,
arXiv:2006.07733.

Defaults follow the paper (§3.3, appendix C/J): projector and predictor are 2-layer MLPs with BN
(hidden 4096, output 256); the target's momentum rises from τ_base = 0.996 to 1 as
``τ = 1 − (1 − τ_base)·(cos(πk/K) + 1)/2``; the loss is the normalised MSE ``2 − 2·cos`` summed over
both view orders; view 1 is always blurred and never solarised, view 2 blurred with p = 0.1 and
solarised with p = 0.2 (table 6). ``predictor_lr_scale`` > 1 updates the predictor faster, which
Tian et al. (arXiv:2102.06810, §4) find helps non-contrastive learning.
"""
from __future__ import annotations

from torch import Tensor, nn

from selfsup.losses.distillation import byol_loss
from selfsup.methods.base import MethodSpec, Progress, step_from_embeddings
from selfsup.methods.registry import register
from selfsup.nn.ema import check_momentum, frozen_copy
from selfsup.nn.heads import mlp
from selfsup.schedules import Schedule
from selfsup.views import byol_pair


@register("byol", "self-distillation", "Grill et al. 2020, Bootstrap Your Own Latent, arXiv:2006.07733")
class BYOL(nn.Module):
    spec = MethodSpec(
        views=byol_pair(),
        test_params={"proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32},
        # a mean of per-sample terms: chunks accumulate without a second pass (embed/loss_from serve GradCache too)
        micro_batches="per_sample",
    )

    def __init__(self, backbone: nn.Module, *, proj_hidden: int = 4096, proj_dim: int = 256, pred_hidden: int = 4096,
                 momentum_start: float = 0.996, momentum_end: float = 1.0, predictor_lr_scale: float = 1.0):
        super().__init__()
        check_momentum("byol", momentum_start, momentum_end)
        if predictor_lr_scale <= 0:
            raise ValueError(f"byol: predictor_lr_scale must be > 0, got {predictor_lr_scale}")
        if min(proj_hidden, proj_dim, pred_hidden) < 1:
            raise ValueError(f"byol: head widths must be ≥ 1, got {proj_hidden}, {proj_dim}, {pred_hidden}")
        self.backbone = backbone
        self.projector = mlp([backbone.num_features, proj_hidden, proj_dim], norm="bn")
        self.predictor = mlp([proj_dim, pred_hidden, proj_dim], norm="bn")
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)
        self.teacher_momentum = Schedule(momentum_start, momentum_end)
        self.predictor_lr_scale = predictor_lr_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        return step_from_embeddings(self, views, progress)

    def embed(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """The online projections ``z1``, ``z2`` and predictions ``p1``, ``p2`` (B, proj_dim)."""
        # Each view goes through the networks alone, so BatchNorm statistics are per view as in the paper.
        z = [self.projector(self.backbone(v)) for v in views]
        p = [self.predictor(zi) for zi in z]
        return {"z1": z[0], "z2": z[1], "p1": p[0], "p2": p[1]}

    def targets(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """The target network's projections ``t1``, ``t2`` (B, proj_dim), without gradient."""
        t = [self.target_projector(self.target_backbone(v)) for v in views]
        return {"t1": t[0], "t2": t[1]}

    def loss_from(self, emb: dict[str, Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        loss = byol_loss(emb["p1"], emb["t2"]) + byol_loss(emb["p2"], emb["t1"])
        return loss, {"z": emb["z1"].detach(), "z_pair": emb["z2"].detach()}

    def schedules(self) -> dict[str, Schedule]:
        return {"teacher_momentum": self.teacher_momentum}

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.target_backbone, self.backbone), (self.target_projector, self.projector)]

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.predictor.parameters()), "lr_scale": self.predictor_lr_scale}]
