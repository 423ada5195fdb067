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
from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.registry import register
from selfsup.nn.heads import mlp
from selfsup.distributed import world_size
from selfsup.nn.memory import IndexedMemory
from selfsup.views import Augment, ViewRecipe, group_by_size


@register("deepclusterv2", "clustering", "Caron et al. 2020, arXiv:2006.09882 (appendix A: DeepCluster-v2)")
class DeepClusterV2(nn.Module):
    spec = MethodSpec(
        views=ViewRecipe(globals_=(Augment(scale=(0.14, 1.0)), Augment(scale=(0.14, 1.0))), local_crops=4,
                         local=Augment(scale=(0.05, 0.14))),
        needs_indices=True,
        test_params={"proj_hidden": 32, "proj_dim": 16, "num_clusters": 4},
    )

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
        self.memory = IndexedMemory(proj_dim)  # one projection per training sample
        self.assignments = IndexedMemory(1, dtype=torch.long, fill=-1)  # its cluster in the last k-means (−1: none)
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
    def cluster(self, epoch: int) -> None:
        """k-means on the filled memory rows: new centroids and a label for each of those samples."""
        rows = self.memory.filled_indices()
        self.centroids, labels = spherical_kmeans(self.memory.rows[rows], self.centroids.shape[0], self.kmeans_iters)
        self.assignments.clear()
        self.assignments.write(rows, labels[:, None])
        self.clustered_epoch.fill_(epoch)
        self.clustered_rows.fill_(rows.numel())

    def training_step(self, views: list[Tensor], progress: Progress,
                      indices: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        z = torch.cat([self.projector(self.backbone(x)) for _, x in group_by_size(views)])
        z = F.normalize(z, dim=1)
        b = views[0].shape[0]
        emb = z[:b].detach().float()
        # Without indices (a call outside the loop) the batch stands in for the whole training set.
        idx = (torch.arange(b) if indices is None else indices).to(self.centroids.device)
        with torch.no_grad():
            if not self.memory.filled.any():  # first step: cluster the first batch rather than nothing
                self.memory.write(idx, emb)
            filled = int(self.memory.filled.sum())
            if progress.epoch != int(self.clustered_epoch) or filled >= 2 * int(self.clustered_rows):
                self.cluster(progress.epoch)
            targets = self.assignments.read(idx)[:, 0]
            unknown = targets < 0
            targets[unknown] = (emb[unknown] @ self.centroids.T).argmax(dim=1)
            self.memory.write(idx, emb)
        scores = (z @ self.centroids.T.to(z.dtype)).view(len(views), b, -1)  # (V, B, K)
        loss = deepcluster_loss(scores, targets, self.temperature)
        logs = {"z": z[:b].detach(), "z_pair": z[b : 2 * b].detach(), "labels_from_kmeans": (~unknown).float().mean()}
        return loss, logs
