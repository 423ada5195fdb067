"""ρMoCo: MoCo (v2-style, with a queue) across ρ clips of one video taken at random times.

Feichtenhofer, Fan, Xiong, Girshick, He. A Large-Scale Study on Unsupervised Spatiotemporal Representation
Learning, CVPR 2021, arXiv:2104.14558 (§3; facebookresearch/SlowFast ``configs/contrastive_ssl/MoCo_SlowR50_8x8.yaml``).

ρ clips of the same video, each from its own random start (``ClipRecipe(clips=ρ)``), are positives of one another:
every clip's query is contrasted with every other clip's momentum key against the queue of past keys, and the
InfoNCE terms are averaged over the ρ(ρ − 1) ordered pairs,

    L = 1/(ρ(ρ − 1)) · Σ_{i ≠ j} InfoNCE(q_i, k_j; queue)

MoCo v2's parts are reused unchanged (:class:`selfsup.methods.mocov2.MoCoV2`: momentum encoder via
``ema_pairs``/``schedules``, split BN for the keys, the queue pushed in ``after_step``, the first step's in-batch
negatives while the queue is empty, the queue/BN checks) and so is its loss,
:func:`~selfsup.losses.contrastive.info_nce` with ``in_batch=False``. At ρ = 2 the loss is MoCo v2's symmetrised:
the mean of its loss with either clip as the query. Every clip's keys join the queue (the paper's
``MOCO_MULTI_VIEW_QUEUE``), ρ·B per step.

Defaults follow the paper's MoCo config: τ = 0.1; a 3-layer MLP head without BN (hidden 2048, output 128); key
momentum 0.994 rising to 1 along a cosine; a queue of 65536 keys; ρ = 2 here for CPUs (the paper's config uses
ρ = 4, its best: ``views.clips: 4``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.losses.contrastive import info_nce
from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.mocov2 import MoCoV2
from selfsup.methods.registry import register
from selfsup.methods.rho_byol import ordered_pairs
from selfsup.nn.ema import check_momentum, frozen_copy
from selfsup.nn.heads import mlp
from selfsup.views.clips import ClipRecipe


@register("rho_moco", "contrastive",
          "Feichtenhofer et al. 2021, A Large-Scale Study on Unsupervised Spatiotemporal Representation Learning, "
          "arXiv:2104.14558")
class RhoMoCo(MoCoV2):
    spec = MethodSpec(
        views=ClipRecipe(clips=2),
        inputs="clips",
        default_backbone="small_r3d",
        test_params={"queue_size": 16, "proj_hidden": 32, "proj_dim": 16, "bn_splits": 2},
        micro_batches="embeddings",
    )

    def __init__(self, backbone: nn.Module, *, temperature: float = 0.1, momentum_start: float = 0.994,
                 momentum_end: float = 1.0, queue_size: int = 65536, proj_hidden: int = 2048, proj_dim: int = 128,
                 proj_layers: int = 3, bn_splits: int = 8, gather: bool = False):
        if temperature <= 0:  # before MoCo v2's checks, so errors name this method
            raise ValueError(f"{self.method_name}: temperature must be > 0, got {temperature}")
        check_momentum(self.method_name, momentum_start, momentum_end)
        if proj_layers < 1:
            raise ValueError(f"{self.method_name}: proj_layers must be ≥ 1, got {proj_layers}")
        super().__init__(backbone, temperature=temperature, momentum_start=momentum_start, momentum_end=momentum_end,
                         queue_size=queue_size, proj_hidden=proj_hidden, proj_dim=proj_dim, bn_splits=bn_splits,
                         gather=gather)
        if proj_layers != 2:  # MoCo v2's head is 2 layers; the paper's video MoCo uses 3
            dims = [backbone.num_features] + [proj_hidden] * (proj_layers - 1) + [proj_dim]
            self.projector = mlp(dims, norm=None)
            self.key_projector = frozen_copy(self.projector)

    def embed(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """The queries ``q`` (B, ρ, proj_dim) of every clip, each clip through the encoder alone (BN per clip)."""
        if len(views) < 2:
            raise ValueError(f"{self.method_name} needs ρ ≥ 2 clips per video (views.clips), got {len(views)}")
        return {"q": torch.stack([self.projector(self.backbone(v)) for v in views], 1)}

    def targets(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """The momentum encoder's keys ``k`` (B, ρ, proj_dim) of every clip (split BN, as MoCo v2's)."""
        return {"k": torch.stack([self._keys(v) for v in views], 1)}

    def loss_from(self, emb: dict[str, Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        q, k = emb["q"], emb["k"]
        queued = self.queue.contents()
        if queued.shape[0]:
            term = lambda i, j: info_nce(q[:, i], k[:, j], self.temperature, negatives=queued, in_batch=False)
        else:  # first step, nothing queued yet: the batch's other keys are the negatives (as MoCo v2 here)
            term = lambda i, j: info_nce(q[:, i], k[:, j], self.temperature, gather=self.gather)
        pairs = ordered_pairs(q.shape[1])
        loss = sum(term(i, j) for i, j in pairs) / len(pairs)
        # every clip's keys join the queue in after_step (MoCo v2's), clip-major: ρ·B rows
        new_keys = F.normalize(k.transpose(0, 1).flatten(0, 1).float(), dim=1)
        return loss, {"z": q[:, 0].detach(), "z_pair": k[:, 1], "new_keys": new_keys}
