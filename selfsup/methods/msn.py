"""MSN: a masked anchor view must match the prototype assignment of an unmasked target view.

Assran, Caron, Misra, Bojanowski, Bordes, Vincent, Joulin, Rabbat, Ballas. Masked Siamese Networks
for Label-Efficient Learning. ECCV 2022, arXiv:2204.07141. Robust to class imbalance (the paper's
§6 and Assran et al. 2023, arXiv:2210.07277, "The hidden uniform cluster prior").

Paper defaults (ViT-S/16): random patch drop 0.15 on anchors (the anchor encoder sees only the kept
patches), an EMA target encoder on the unmasked view (momentum 0.996 → 1), a 3-layer projector
(hidden 2048, BN, GELU, output 256), 1024 learnable l2-normalised prototypes, anchor τ = 0.1,
sharpened targets τ⁺ = 0.025 (T = 0.25), Sinkhorn on targets, me-max weight 1, AdamW.
CPU adaptations: one anchor view beside the target (paper: 1 random + 10 focal 96 px views; the ViT
encodes smaller crops since issue #19, but this method takes one fixed pair of views), weight decay also reaches the
prototypes (the paper exempts them; the optimiser's groups decide decay by parameter shape).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from selfsup.losses.msn import msn_loss
from selfsup.methods.base import MethodSpec, Progress, by_sample, by_view, step_from_embeddings
from selfsup.methods.registry import register
from selfsup.nn.ema import check_momentum, frozen_copy
from selfsup.nn.heads import mlp
from selfsup.nn.masking import check_mask_ratio, random_masking
from selfsup.nn.vit import require_vit
from selfsup.schedules import Schedule
from selfsup.views import Augment, ViewRecipe


@register("msn", "self-distillation", "Assran et al. 2022, Masked Siamese Networks for Label-Efficient Learning, arXiv:2204.07141")
class MSN(nn.Module):
    spec = MethodSpec(
        # target, then anchors
        views=ViewRecipe(globals_=(Augment(scale=(0.3, 1.0)), Augment(scale=(0.3, 1.0)))),
        default_backbone="vit_tiny",
        min_steps=600,
        # draws its masks inside training_step: parity tests compare its loss, not its step
        stochastic_step=True,
        test_params={"num_prototypes": 32, "proj_hidden": 64, "proj_dim": 32},
        micro_batches="embeddings",
    )

    def __init__(self, backbone: nn.Module, *, mask_ratio: float = 0.15, num_prototypes: int = 1024,
                 proj_hidden: int = 2048, proj_dim: int = 256, temperature: float = 0.1,
                 target_temperature: float = 0.025, me_max_weight: float = 1.0, sinkhorn_iterations: int = 3,
                 momentum_start: float = 0.996, momentum_end: float = 1.0, gather: bool = False):
        super().__init__()
        vit = require_vit(backbone, "msn")
        check_mask_ratio(mask_ratio, vit.num_patches)
        if temperature <= 0 or target_temperature <= 0:
            raise ValueError(f"msn: temperatures must be > 0, got {temperature} and {target_temperature}")
        if target_temperature > temperature:
            raise ValueError(f"msn: target_temperature ({target_temperature}) must not exceed temperature "
                             f"({temperature}); targets are sharpened")
        check_momentum("msn", momentum_start, momentum_end)
        if num_prototypes < 2 or me_max_weight < 0 or sinkhorn_iterations < 0:
            raise ValueError(f"msn: need ≥ 2 prototypes, me_max_weight ≥ 0 and sinkhorn_iterations ≥ 0, got "
                             f"{num_prototypes}, {me_max_weight}, {sinkhorn_iterations}")
        self.backbone = vit
        self.projector = mlp([vit.num_features, proj_hidden, proj_hidden, proj_dim], norm="bn", activation=nn.GELU)
        self.target_encoder = frozen_copy(vit)
        self.target_projector = frozen_copy(self.projector)
        bound = 1 / math.sqrt(proj_dim)
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, proj_dim).uniform_(-bound, bound))
        self.mask_ratio = mask_ratio
        self.loss_args = dict(temperature=temperature, target_temperature=target_temperature,
                              me_max_weight=me_max_weight, sinkhorn_iterations=sinkhorn_iterations, gather=gather)
        self.teacher_momentum = Schedule(momentum_start, momentum_end)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        return step_from_embeddings(self, views, progress)

    def embed(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """The masked anchor views' projections, ``anchor`` (B, V − 1, proj_dim): views 1… with ``mask_ratio`` of
        their patches dropped, drawn here."""
        anchors = torch.cat(views[1:])  # anchors view-major: (V·B, C, H, W)
        keep = random_masking(anchors.shape[0], self.backbone.num_patches, self.mask_ratio, anchors.device).keep
        anchor = self.projector(self.backbone.pool_tokens(self.backbone.encode_visible(anchors, keep)))
        return {"anchor": by_sample(anchor, views[0].shape[0])}

    def targets(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """The target encoder's projection of the whole view 0, ``target`` (B, proj_dim)."""
        t = self.target_encoder
        return {"target": self.target_projector(t.pool_tokens(t.encode(t.patch_tokens(views[0]))))}

    def loss_from(self, emb: dict[str, Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        anchor, target = by_view(emb["anchor"]), emb["target"]
        loss, parts = msn_loss(anchor, target, self.prototypes, **self.loss_args)
        b = target.shape[0]
        return loss, {**parts, "z": anchor[:b].detach(), "z_pair": target.detach()}

    def schedules(self) -> dict[str, Schedule]:
        return {"teacher_momentum": self.teacher_momentum}

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.target_encoder, self.backbone), (self.target_projector, self.projector)]

