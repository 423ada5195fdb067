"""DenseCL: MoCo v2 plus a dense contrast between matched locations of the two views' feature maps.

Wang, Zhang, Shen, Kong, Li. Dense Contrastive Learning for Self-Supervised Visual Pre-Training, CVPR 2021,
arXiv:2011.09157; reference: WXinlong/DenseCL ``openselfsup/models/densecl.py`` and ``necks.py`` (DenseCLNeck).

Two branches on one backbone pass per view (:func:`~selfsup.nn.feature_maps.forward_maps`):

- global: MoCo v2 (arXiv:2003.04297) on the pooled features, MLP fc–ReLU–fc without BN (2048 hidden, 128 out);
- dense: the backbone's last map (B, C, H, W), each of its S² = H·W locations through the same kind of MLP (the
  reference's conv1×1–ReLU–conv1×1, applied here as ``mlp`` over the flattened (B·S², C) locations, which is the same
  map), giving S² dense vectors per view. Each query location is matched to the key location whose *backbone*
  feature is most similar (cosine, argmax over the S² key locations); the dense InfoNCE takes that key location's
  dense vector as the positive and, as negatives, a second queue holding per image the l2-normalised mean over
  locations of its key dense projections.

Loss = (1 − λ)·L_global + λ·L_dense with λ = 0.5; ``warmup_steps`` sets λ = 0 for the first steps (the reference's
``DenseCLWarmupHook``, ``start_iters``, which its released configs do not use: default 0). Both InfoNCEs use
τ = 0.2; the key encoder (backbone and both heads) moves by momentum 0.999; queues of 65536.

As :mod:`selfsup.methods.mocov2`, and deviating from the reference the same way: both queues start empty instead
of filled with random unit vectors, and the first step, with nothing queued, contrasts within the batch — the
global branch against the batch's other keys, the dense branch against the other images' pooled dense keys (from
every process with ``gather``). Keys get split BN (mocov2's single-process stand-in for shuffling BN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.distributed import gather_no_grad, rank
from selfsup.losses.contrastive import info_nce
from selfsup.losses.dense import densecl_dense_loss, flatten_map, match_by_cosine, take_locations
from selfsup.losses.precision import at_least_f32
from selfsup.methods.base import MethodSpec, Progress, step_from_embeddings
from selfsup.methods.mocov2 import queue_and_split_problems, split_batchnorm
from selfsup.methods.registry import register
from selfsup.nn.ema import check_momentum, frozen_copy
from selfsup.nn.feature_maps import forward_maps, map_levels
from selfsup.nn.heads import mlp
from selfsup.nn.queue import MemoryQueue
from selfsup.schedules import Schedule
from selfsup.views import Augment, ViewRecipe


def encode_dense(backbone: nn.Module, projector: nn.Module, dense_projector: nn.Module,
                 x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One backbone pass → (global projection (B, D), dense projections (B, S², D), backbone map vectors (B, S², C))."""
    pooled, (feature_map,) = forward_maps(backbone, x)
    feats = flatten_map(feature_map)
    b, n, c = feats.shape
    return projector(pooled), dense_projector(feats.reshape(b * n, c)).view(b, n, -1), feats


@register("densecl", "contrastive",
          "Wang et al. 2021, Dense Contrastive Learning for Self-Supervised Visual Pre-Training, arXiv:2011.09157")
class DenseCL(nn.Module):
    spec = MethodSpec(
        # MoCo v2's crops, as the reference configs
        views=ViewRecipe(globals_=(Augment(scale=(0.2, 1.0)), Augment(scale=(0.2, 1.0)))),
        test_params={"queue_size": 16, "proj_hidden": 32, "proj_dim": 16, "bn_splits": 2},
        micro_batches="embeddings",
    )

    def __init__(self, backbone: nn.Module, *, temperature: float = 0.2, momentum_start: float = 0.999,
                 momentum_end: float = 0.999, queue_size: int = 65536, proj_hidden: int = 2048, proj_dim: int = 128,
                 dense_weight: float = 0.5, warmup_steps: int = 0, bn_splits: int = 8, gather: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"densecl: temperature must be > 0, got {temperature}")
        check_momentum("densecl", momentum_start, momentum_end)
        if queue_size < 1:
            raise ValueError(f"densecl: queue_size must be ≥ 1, got {queue_size}")
        if bn_splits < 1:
            raise ValueError(f"densecl: bn_splits must be ≥ 1, got {bn_splits}")
        if not 0.0 <= dense_weight <= 1.0:
            raise ValueError(f"densecl: dense_weight (λ, the dense loss's share) must be in [0, 1], got {dense_weight}")
        if warmup_steps < 0:
            raise ValueError(f"densecl: warmup_steps must be ≥ 0, got {warmup_steps}")
        if min(proj_hidden, proj_dim) < 1:
            raise ValueError(f"densecl: projector widths must be ≥ 1, got {proj_hidden} and {proj_dim}")
        channels = map_levels(backbone, backbone.in_chans, backbone.image_size)[-1].channels
        self.backbone = backbone
        self.projector = mlp([backbone.num_features, proj_hidden, proj_dim], norm=None)
        self.dense_projector = mlp([channels, proj_hidden, proj_dim], norm=None)
        self.key_backbone = frozen_copy(backbone)
        self.key_projector = frozen_copy(self.projector)
        self.key_dense_projector = frozen_copy(self.dense_projector)
        self.queue = MemoryQueue(queue_size, proj_dim)
        self.dense_queue = MemoryQueue(queue_size, proj_dim)
        self.temperature = temperature
        self.teacher_momentum = Schedule(momentum_start, momentum_end)  # constant in the paper
        self.dense_weight, self.warmup_steps = dense_weight, warmup_steps
        self.bn_splits = bn_splits
        self.gather = gather

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    @torch.no_grad()
    def _keys(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C, H, W) → the key encoder's :func:`encode_dense` outputs, with BN statistics from random sub-batches
        (split BN, as MoCo v2's keys)."""
        return split_batchnorm(lambda p: encode_dense(self.key_backbone, self.key_projector, self.key_dense_projector, p),
                               x, self.bn_splits)

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        return step_from_embeddings(self, views, progress)

    def embed(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """The query view's :func:`encode_dense` outputs: ``q`` (B, D), ``q_dense`` (B, S², D), ``q_feats`` (B, S², C)."""
        q, q_dense, q_feats = encode_dense(self.backbone, self.projector, self.dense_projector, views[0])
        return {"q": q, "q_dense": q_dense, "q_feats": q_feats}

    def targets(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """The key encoder's outputs of the second view, ``k``, ``k_dense``, ``k_feats`` (shapes as ``embed``'s)."""
        k, k_dense, k_feats = self._keys(views[1])
        return {"k": k, "k_dense": k_dense, "k_feats": k_feats}

    def loss_from(self, emb: dict[str, Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        q, q_dense, q_feats = emb["q"], emb["q_dense"], emb["q_feats"]
        k, k_dense, k_feats = emb["k"], emb["k_dense"], emb["k_feats"]
        positive = take_locations(k_dense, match_by_cosine(q_feats.detach(), k_feats))
        # the reference pools the key dense projections before normalising them (DenseCLNeck's avgpool2)
        k_pooled = F.normalize(at_least_f32(k_dense).mean(dim=1), dim=1)
        queued, queued_dense = self.queue.contents(), self.dense_queue.contents()
        if queued.shape[0]:
            global_loss = info_nce(q, k, self.temperature, negatives=queued, in_batch=False)
            dense_loss = densecl_dense_loss(q_dense, positive, self.temperature, queued_dense)
        else:  # first step, nothing queued yet: the batch's other images are the negatives (mocov2's first step)
            global_loss = info_nce(q, k, self.temperature, gather=self.gather)
            pooled_all = gather_no_grad(k_pooled) if self.gather else k_pooled
            first = rank() * q.shape[0] if self.gather else 0
            dense_loss = densecl_dense_loss(q_dense, positive, self.temperature, pooled_all,
                                            own_rows=range(first, first + q.shape[0]))
        lam = 0.0 if progress.step < self.warmup_steps else self.dense_weight
        loss = (1 - lam) * global_loss + lam * dense_loss
        # this step's keys join the queues in after_step, once the step is taken
        return loss, {"z": q.detach(), "z_pair": k, "loss_global": global_loss.detach(),
                      "loss_dense": dense_loss.detach(), "new_keys": F.normalize(at_least_f32(k), dim=1),
                      "new_dense_keys": k_pooled}

    def schedules(self) -> dict[str, Schedule]:
        return {"teacher_momentum": self.teacher_momentum}

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.key_backbone, self.backbone), (self.key_projector, self.projector),
                (self.key_dense_projector, self.dense_projector)]

    def after_step(self, progress: Progress, logs: dict[str, Tensor]) -> None:
        for queue, keys in ((self.queue, logs["new_keys"]), (self.dense_queue, logs["new_dense_keys"])):
            queue.push(gather_no_grad(keys) if self.gather else keys)

    def check_run(self, n_train: int, batch_size: int, recipe: ViewRecipe) -> list[str]:
        return queue_and_split_problems(self.queue.size, self.bn_splits, n_train, batch_size)
