"""MoCo v2: contrast each query with its momentum-encoded key and a queue of past keys.

He, Fan, Wu, Xie, Girshick. Momentum Contrast for Unsupervised Visual Representation Learning,
arXiv:1911.05722 (Algorithm 1); Chen, Fan, Girshick, He. Improved Baselines with Momentum Contrastive
Learning, arXiv:2003.04297 (MLP head, τ = 0.2, stronger augmentation, cosine lr).

Defaults follow the papers: 2-layer MLP head without BN (2048 hidden, 128 out), τ = 0.2, key-encoder
momentum 0.999, a queue of 65536 keys. One deviation: the reference code fills the queue with random
unit vectors at the start; here it starts empty and only real keys are negatives (the very first step,
with nothing queued, contrasts against the batch's other keys instead). Random vectors are much easier
negatives than real keys, so with them the loss rises as they are replaced, and for short runs most of
the first queue's worth of steps would contrast against noise.

Shuffling BN (arXiv:1911.05722 §3.3): with BN computed over the very batch that holds a query's
positive, the model can "cheat" by reading batch statistics instead of learning the image. On one
process, shuffling the key batch alone changes nothing (BN statistics are permutation invariant), so the
single-process equivalent used here is split BN: the key batch is randomly permuted, cut into
``bn_splits`` sub-batches that each go through the key encoder with their own BN statistics, and the keys
are put back in order; queries see full-batch statistics, so a query and its key never share the same
statistics. Across processes each rank splits its own batch; the cross-rank shuffle belongs to the
distributed launcher.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.losses.contrastive import info_nce
from selfsup.methods.base import MethodSpec, Progress, step_from_embeddings
from selfsup.methods.registry import register
from selfsup.nn.ema import check_momentum, frozen_copy
from selfsup.nn.heads import mlp
from selfsup.nn.queue import MemoryQueue
from selfsup.distributed import gather_no_grad
from selfsup.schedules import Schedule
from selfsup.views import Augment, ViewRecipe


@register("mocov2", "contrastive", "Chen et al. 2020, Improved Baselines with Momentum Contrast, arXiv:2003.04297")
class MoCoV2(nn.Module):
    spec = MethodSpec(
        # MoCo v2's crops
        views=ViewRecipe(globals_=(Augment(scale=(0.2, 1.0)), Augment(scale=(0.2, 1.0)))),
        test_params={"queue_size": 16, "proj_hidden": 32, "proj_dim": 16, "bn_splits": 2},
        micro_batches="embeddings",
    )

    def __init__(self, backbone: nn.Module, *, temperature: float = 0.2, momentum_start: float = 0.999,
                 momentum_end: float = 0.999, queue_size: int = 65536, proj_hidden: int = 2048, proj_dim: int = 128, bn_splits: int = 8,
                 gather: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"mocov2: temperature must be > 0, got {temperature}")
        check_momentum("mocov2", momentum_start, momentum_end)
        if queue_size < 1:
            raise ValueError(f"mocov2: queue_size must be ≥ 1, got {queue_size}")
        if bn_splits < 1:
            raise ValueError(f"mocov2: bn_splits must be ≥ 1, got {bn_splits}")
        self.backbone = backbone
        self.projector = mlp([backbone.num_features, proj_hidden, proj_dim], norm=None)
        self.key_backbone = frozen_copy(backbone)
        self.key_projector = frozen_copy(self.projector)
        self.queue = MemoryQueue(queue_size, proj_dim)
        self.temperature = temperature
        self.teacher_momentum = Schedule(momentum_start, momentum_end)  # constant in the paper
        self.bn_splits = bn_splits
        self.gather = gather

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    @torch.no_grad()
    def _keys(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, proj_dim) keys, with BN statistics from random sub-batches (split BN)."""
        (keys,) = split_batchnorm(lambda p: (self.key_projector(self.key_backbone(p)),), x, self.bn_splits)
        return keys

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        return step_from_embeddings(self, views, progress)

    def embed(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """The queries ``q`` (B, proj_dim) of the first view."""
        return {"q": self.projector(self.backbone(views[0]))}

    def targets(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """The momentum encoder's keys ``k`` (B, proj_dim) of the second view."""
        return {"k": self._keys(views[1])}

    def loss_from(self, emb: dict[str, Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        q, k = emb["q"], emb["k"]
        queued = self.queue.contents()
        if queued.shape[0]:
            loss = info_nce(q, k, self.temperature, negatives=queued, in_batch=False)
        else:  # first step, nothing queued yet: the batch's other keys are the negatives (MoCo v3's form)
            loss = info_nce(q, k, self.temperature, gather=self.gather)
        # this step's keys join the queue in after_step, once the step is taken
        return loss, {"z": q.detach(), "z_pair": k, "new_keys": F.normalize(k.float(), dim=1)}

    def schedules(self) -> dict[str, Schedule]:
        return {"teacher_momentum": self.teacher_momentum}

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.key_backbone, self.backbone), (self.key_projector, self.projector)]

    def after_step(self, progress: Progress, logs: dict[str, Tensor]) -> None:
        keys = logs["new_keys"]
        self.queue.push(gather_no_grad(keys) if self.gather else keys)

    def check_run(self, n_train: int, batch_size: int, recipe: ViewRecipe) -> list[str]:
        return queue_and_split_problems(self.queue.size, self.bn_splits, n_train, batch_size)


def split_batchnorm(encode: Callable[[Tensor], tuple[Tensor, ...]], x: Tensor, splits: int) -> tuple[Tensor, ...]:
    """``encode`` applied to random sub-batches of ``x`` (B, …), its outputs put back in the batch's order: split BN,
    the single-process stand-in for shuffling BN (module docstring). Shared with DenseCL's keys."""
    perm = torch.randperm(x.shape[0], device=x.device)
    parts = [encode(p) for p in x[perm].tensor_split(splits)]
    unperm = torch.argsort(perm)
    return tuple(torch.cat(outs)[unperm] for outs in zip(*parts))


def queue_and_split_problems(queue_size: int, bn_splits: int, n_train: int, batch_size: int) -> list[str]:
    """A queue larger than the data (it would hold the query's own image as a negative) and BN sub-batches of fewer
    than two images: the checks every MoCo-style method makes before training."""
    problems = []
    if queue_size > n_train:
        problems.append(f"the queue ({queue_size} keys) is larger than the {n_train} training images, so it "
                        f"would hold keys of the query's own image as negatives; set method.params.queue_size "
                        f"≤ {n_train}")
    if batch_size // bn_splits < 2:
        problems.append(f"bn_splits={bn_splits} leaves fewer than 2 images per BN sub-batch at batch size "
                        f"{batch_size}; lower method.params.bn_splits")
    return problems
