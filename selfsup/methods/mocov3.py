"""MoCo v3: symmetric in-batch InfoNCE between a predictor on the query side and a momentum encoder.

Chen, Xie, He. An Empirical Study of Training Self-Supervised Vision Transformers, ICCV 2021,
arXiv:2104.02057 (Algorithm 1, §3 and appendix; facebookresearch/moco-v3 for the ResNet recipe).

No queue: the other keys of the (large) batch are the negatives. Loss ``ctr(q1, k2) + ctr(q2, k1)``,
each term scaled by 2τ as in Algorithm 1. Defaults follow the ResNet-50 recipe: projector 2 layers
(hidden 4096, output 256), predictor 2 layers, BN after every layer including the last (affine-free),
τ = 1.0, momentum from 0.99 to 1 along a cosine.
"""
from __future__ import annotations

from torch import Tensor, nn

from selfsup.losses.contrastive import info_nce
from selfsup.methods.base import MethodSpec, Progress, step_from_embeddings
from selfsup.methods.registry import register
from selfsup.nn.ema import check_momentum, frozen_copy
from selfsup.nn.heads import mlp
from selfsup.schedules import Schedule
from selfsup.views import byol_pair


@register("mocov3", "contrastive", "Chen, Xie, He 2021, Training Self-Supervised Vision Transformers, arXiv:2104.02057")
class MoCoV3(nn.Module):
    spec = MethodSpec(
        views=byol_pair(),
        test_params={"proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32},
        micro_batches="embeddings",
    )

    def __init__(self, backbone: nn.Module, *, temperature: float = 1.0, momentum_start: float = 0.99,
                 momentum_end: float = 1.0,
                 proj_hidden: int = 4096, proj_dim: int = 256, proj_layers: int = 2, pred_hidden: int = 4096,
                 gather: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"mocov3: temperature must be > 0, got {temperature}")
        check_momentum("mocov3", momentum_start, momentum_end)
        if proj_layers < 1:
            raise ValueError(f"mocov3: proj_layers must be ≥ 1, got {proj_layers}")
        self.backbone = backbone
        dims = [backbone.num_features] + [proj_hidden] * (proj_layers - 1) + [proj_dim]
        self.projector = mlp(dims, norm="bn", last_norm=True)
        self.predictor = mlp([proj_dim, pred_hidden, proj_dim], norm="bn", last_norm=True)
        self.momentum_backbone = frozen_copy(backbone)
        self.momentum_projector = frozen_copy(self.projector)
        self.temperature = temperature
        self.teacher_momentum = Schedule(momentum_start, momentum_end)
        self.gather = gather

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        return step_from_embeddings(self, views, progress)

    def embed(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """Projections ``z1``, ``z2`` and queries ``q1``, ``q2`` (B, proj_dim) of the two views."""
        x1, x2 = views
        # each view through the encoders on its own, as the reference code: BN statistics per view
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        return {"z1": z1, "z2": z2, "q1": self.predictor(z1), "q2": self.predictor(z2)}

    def targets(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """The momentum encoder's keys ``k1``, ``k2`` (B, proj_dim)."""
        return {f"k{i + 1}": self.momentum_projector(self.momentum_backbone(x)) for i, x in enumerate(views)}

    def loss_from(self, emb: dict[str, Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        tau = self.temperature
        loss = 2 * tau * (info_nce(emb["q1"], emb["k2"], tau, gather=self.gather)
                          + info_nce(emb["q2"], emb["k1"], tau, gather=self.gather))
        return loss, {"z": emb["z1"].detach(), "z_pair": emb["z2"].detach()}

    def schedules(self) -> dict[str, Schedule]:
        return {"teacher_momentum": self.teacher_momentum}

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.momentum_backbone, self.backbone), (self.momentum_projector, self.projector)]
