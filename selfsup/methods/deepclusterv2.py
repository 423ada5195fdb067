"""DeepCluster-v2: k-means on a memory of the whole training set gives pseudo-labels; each crop predicts its
image's cluster with a cross-entropy over cosines to the centroids.

Caron et al. 2020, arXiv:2006.09882, appendix A (reference: facebookresearch/swav ``main_deepclusterv2.py``).
Defaults follow it: 2-layer MLP projector to 128-d, l2-normalised; cosine k-means, 10 iterations; the
centroids are the prototypes (the reference copies them into a prototype layer it never trains); τ = 0.1;
multi-crop. One clustering head (the reference averages three heads of 3000 clusters).

The memory holds one detached projection (global crop 0) per training sample, written at the sample's index
as batches pass, so it is up to one epoch old when clustered, as in the reference. Clustering runs at the
start of every epoch. Warm-up: the reference fills the memory with a full extra pass before training; the
loop here has no such pass, so during the first epoch the memory fills as batches arrive and k-means reruns
each time the number of filled rows has doubled (the first time on the first batch alone). A sample not yet
in the last clustering takes its nearest centroid as label.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.losses.clustering import deepcluster_loss, spherical_kmeans
from selfsup.methods.base import Progress
from selfsup.methods.registry import register
from selfsup.nn.heads import mlp
from selfsup.distributed import world_size
from selfsup.views import Augment, ViewRecipe, group_by_size

_SIZED_BY_DATA = ("memory", "filled", "assignments")


@register("deepclusterv2", "clustering", "Caron et al. 2020, arXiv:2006.09882 (appendix A: DeepCluster-v2)")
class DeepClusterV2(nn.Module):
    views = ViewRecipe(globals_=(Augment(scale=(0.14, 1.0)), Augment(scale=(0.14, 1.0))), local_crops=4,
                       local=Augment(scale=(0.05, 0.14)))
    min_batch_size = 2
    needs_indices = True
    """The loop passes ``indices=`` (B,): the batch's positions in the training set, keys of the memory."""
    test_params = {"proj_hidden": 32, "proj_dim": 16, "num_clusters": 4}

    def __init__(self, backbone: nn.Module, *, num_clusters: int = 3000, temperature: float = 0.1,
                 kmeans_iters: int = 10, proj_hidden: int = 2048, proj_dim: int = 128):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"deepclusterv2: temperature must be > 0, got {temperature}")
        if num_clusters < 1 or kmeans_iters < 0:
            raise ValueError(f"deepclusterv2: need num_clusters ≥ 1 and kmeans_iters ≥ 0, got {num_clusters} "
                             f"and {kmeans_iters}")
        self.backbone = backbone
        self.projector = mlp([backbone.num_features, proj_hidden, proj_dim], norm="bn")
        self.temperature, self.kmeans_iters = temperature, kmeans_iters
        self.register_buffer("centroids", F.normalize(torch.randn(num_clusters, proj_dim), dim=1))
        # Sized by the largest sample index seen, so the method needs no dataset size at construction.
        self.register_buffer("memory", torch.zeros(0, proj_dim))
        self.register_buffer("filled", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("assignments", torch.zeros(0, dtype=torch.long))
        self.register_buffer("clustered_epoch", torch.tensor(-1))
        self.register_buffer("clustered_rows", torch.tensor(0))

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def check_run(self, n_train: int, batch_size: int, recipe: ViewRecipe) -> list[str]:
        problems = []
        k = self.centroids.shape[0]
        if k > n_train:
            problems.append(f"{k} clusters for {n_train} training images; lower method.params.num_clusters")
        if world_size() > 1:
            problems.append("the sample memory is per process and k-means is not distributed; run on one process")
        return problems

    @torch.no_grad()
    def _grow(self, n: int) -> None:
        if n > self.memory.shape[0]:
            extra = n - self.memory.shape[0]
            self.memory = torch.cat([self.memory, self.memory.new_zeros(extra, self.memory.shape[1])])
            self.filled = torch.cat([self.filled, self.filled.new_zeros(extra)])
            self.assignments = torch.cat([self.assignments, self.assignments.new_full((extra,), -1)])

    @torch.no_grad()
    def cluster(self, epoch: int) -> None:
        """k-means on the filled memory rows: new centroids and a label for each of those samples."""
        rows = self.filled.nonzero().squeeze(1)
        self.centroids, labels = spherical_kmeans(self.memory[rows], self.centroids.shape[0], self.kmeans_iters)
        self.assignments.fill_(-1)
        self.assignments[rows] = labels
        self.clustered_epoch.fill_(epoch)
        self.clustered_rows.fill_(rows.numel())

    def training_step(self, views: list[Tensor], progress: Progress,
                      indices: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        z = torch.cat([self.projector(self.backbone(x)) for _, x in group_by_size(views)])
        z = F.normalize(z, dim=1)
        b = views[0].shape[0]
        emb = z[:b].detach().float()
        # Without indices (a call outside the loop) the batch stands in for the whole training set.
        idx = (torch.arange(b) if indices is None else indices).to(self.memory.device)
        with torch.no_grad():
            self._grow(int(idx.max()) + 1)
            if not self.filled.any():  # first step: cluster the first batch rather than nothing
                self.memory[idx], self.filled[idx] = emb, True
            if progress.epoch != int(self.clustered_epoch) or int(self.filled.sum()) >= 2 * int(self.clustered_rows):
                self.cluster(progress.epoch)
            targets = self.assignments[idx]
            unknown = targets < 0
            targets[unknown] = (emb[unknown] @ self.centroids.T).argmax(dim=1)
            self.memory[idx], self.filled[idx] = emb, True
        scores = (z @ self.centroids.T.to(z.dtype)).view(len(views), b, -1)  # (V, B, K)
        loss = deepcluster_loss(scores, targets, self.temperature)
        logs = {"z": z[:b].detach(), "z_pair": z[b : 2 * b].detach(), "labels_from_kmeans": (~unknown).float().mean()}
        return loss, logs

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The memory grows with the data, so a checkpoint's may be larger than a fresh model's.
        for name in _SIZED_BY_DATA:
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, getattr(self, name).new_zeros(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
