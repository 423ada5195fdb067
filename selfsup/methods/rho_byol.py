"""ρBYOL: BYOL across ρ clips of one video taken at random times.

Feichtenhofer, Fan, Xiong, Girshick, He. A Large-Scale Study on Unsupervised Spatiotemporal Representation
Learning, CVPR 2021, arXiv:2104.14558 (§3; facebookresearch/SlowFast ``configs/contrastive_ssl``).

The objective that turns an image method into a video one: ρ clips of the same video, each from its own random
start (``ClipRecipe(clips=ρ)``), are positives of one another — every clip is a query against every other clip's
target, so the representation is encouraged to persist over time. BYOL's parts are reused unchanged
(:class:`selfsup.methods.byol.BYOL`: projector, predictor, EMA target via ``ema_pairs``/``schedules``, predictor
learning-rate scale) and so is its loss, :func:`~selfsup.losses.distillation.byol_loss` (arXiv:2006.07733):

    L = 2/(ρ(ρ − 1)) · Σ_{i ≠ j} byol_loss(p_i, t_j)

with p_i the online prediction of clip i and t_j the target projection of clip j (no gradient): BYOL's loss of
both orders of a pair, averaged over the ρ(ρ − 1)/2 pairs, which is exactly BYOL's loss at ρ = 2 (so the image
recipes' learning rates carry over), and twice the mean over ordered pairs.

Defaults follow the paper's BYOL config (BYOL_SlowR50_8x8.yaml): projector and predictor 2 layers with BN, hidden
4096, output 256; target momentum 0.996 rising to 1 along a cosine; ρ = 2 here for CPUs (the paper's best is
ρ = 4: ``views.clips: 4``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.losses.distillation import byol_loss
from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.byol import BYOL
from selfsup.methods.registry import register
from selfsup.nn.ema import check_momentum
from selfsup.views.clips import ClipRecipe


def ordered_pairs(n: int) -> list[tuple[int, int]]:
    """Every (query, key) pair of distinct clips out of ``n``: n(n − 1) of them."""
    return [(i, j) for i in range(n) for j in range(n) if i != j]


@register("rho_byol", "self-distillation",
          "Feichtenhofer et al. 2021, A Large-Scale Study on Unsupervised Spatiotemporal Representation Learning, "
          "arXiv:2104.14558")
class RhoBYOL(BYOL):
    spec = MethodSpec(
        views=ClipRecipe(clips=2),
        inputs="clips",
        default_backbone="small_r3d",
        test_params={"proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32},
        micro_batches="per_sample",
    )

    def __init__(self, backbone: nn.Module, *, proj_hidden: int = 4096, proj_dim: int = 256, pred_hidden: int = 4096,
                 momentum_start: float = 0.996, momentum_end: float = 1.0, predictor_lr_scale: float = 1.0):
        check_momentum(self.method_name, momentum_start, momentum_end)  # before BYOL's, so errors name this method
        super().__init__(backbone, proj_hidden=proj_hidden, proj_dim=proj_dim, pred_hidden=pred_hidden,
                         momentum_start=momentum_start, momentum_end=momentum_end,
                         predictor_lr_scale=predictor_lr_scale)

    def embed(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """Online projections ``z`` and predictions ``p``, (B, ρ, proj_dim): clip v at ``[:, v]``."""
        if len(views) < 2:
            raise ValueError(f"{self.method_name} needs ρ ≥ 2 clips per video (views.clips), got {len(views)}")
        # each clip through the networks alone, as BYOL's views: BatchNorm statistics per clip
        z = [self.projector(self.backbone(v)) for v in views]
        return {"z": torch.stack(z, 1), "p": torch.stack([self.predictor(zi) for zi in z], 1)}

    def targets(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """The EMA target's projections ``t`` (B, ρ, proj_dim), without gradient."""
        return {"t": torch.stack([self.target_projector(self.target_backbone(v)) for v in views], 1)}

    def loss_from(self, emb: dict[str, Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        p, t, z = emb["p"], emb["t"], emb["z"]
        pairs = ordered_pairs(p.shape[1])
        loss = 2 * sum(byol_loss(p[:, i], t[:, j]) for i, j in pairs) / len(pairs)
        return loss, {"z": z[:, 0].detach(), "z_pair": z[:, 1].detach()}
