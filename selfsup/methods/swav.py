"""SwAV: predict the cluster code of one view from another view, with codes from Sinkhorn–Knopp.

Caron, Misra, Mairal, Goyal, Bojanowski, Joulin. Unsupervised Learning of Visual Features by Contrasting
Cluster Assignments. NeurIPS 2020, arXiv:2006.09882.

Defaults follow the paper (and facebookresearch/swav ``main_swav.py``): a 2-layer MLP projector to 128-d,
l2-normalised; prototypes are a bias-free linear layer whose rows are l2-normalised before every step;
codes of the 2 global crops by Sinkhorn–Knopp (ε = 0.05, 3 iterations) without gradient; swapped
prediction over all crops with τ = 0.1; multi-crop 2 global (scale 0.14–1) + local crops (scale
0.05–0.14; the paper uses 6, here 4 by default); prototypes frozen for the first 313 iterations;
an optional queue of past projections (off by default; the paper uses it for small batches).
``proj_layers``/``proj_bn`` give SEER's head (Goyal et al. 2021, arXiv:2103.01988: SwAV at scale): three
linear layers without BatchNorm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.losses.clustering import sinkhorn_knopp, swav_loss
from selfsup.methods.base import MethodSpec, Progress, by_sample, by_view, step_from_embeddings
from selfsup.methods.registry import register
from selfsup.nn.heads import mlp
from selfsup.nn.queue import MemoryQueue
from selfsup.views import Augment, ViewRecipe, group_by_size

N_GLOBAL = 2


@register("swav", "clustering", "Caron et al. 2020, Unsupervised Learning of Visual Features by Contrasting "
                                "Cluster Assignments (SwAV), arXiv:2006.09882")
class SwAV(nn.Module):
    spec = MethodSpec(
        views=ViewRecipe(globals_=(Augment(scale=(0.14, 1.0)), Augment(scale=(0.14, 1.0))), local_crops=4,
                         local=Augment(scale=(0.05, 0.14))),
        test_params={"proj_hidden": 32, "proj_dim": 16, "num_prototypes": 8, "freeze_prototypes_iters": 0},
        micro_batches="embeddings",
    )

    def __init__(self, backbone: nn.Module, *, num_prototypes: int = 3000, temperature: float = 0.1,
                 epsilon: float = 0.05, sinkhorn_iterations: int = 3, proj_hidden: int = 2048, proj_dim: int = 128,
                 freeze_prototypes_iters: int = 313, queue_length: int = 0, proj_layers: int = 2,
                 proj_bn: bool = True, gather: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"swav: temperature must be > 0, got {temperature}")
        if epsilon <= 0:
            raise ValueError(f"swav: epsilon must be > 0, got {epsilon}")
        if num_prototypes < 1 or sinkhorn_iterations < 1:
            raise ValueError(f"swav: num_prototypes and sinkhorn_iterations must be ≥ 1, got {num_prototypes} "
                             f"and {sinkhorn_iterations}")
        if proj_layers < 1:
            raise ValueError(f"swav: proj_layers must be ≥ 1, got {proj_layers}")
        if freeze_prototypes_iters < 0 or queue_length < 0:
            raise ValueError(f"swav: freeze_prototypes_iters and queue_length must be ≥ 0, got "
                             f"{freeze_prototypes_iters} and {queue_length}")
        self.backbone = backbone
        # proj_layers linear layers: SwAV's 2 (with BatchNorm), SEER's 3 (without)
        dims = [backbone.num_features] + [proj_hidden] * (proj_layers - 1) + [proj_dim]
        self.projector = mlp(dims, norm="bn" if proj_bn else None)
        self.prototypes = nn.Linear(proj_dim, num_prototypes, bias=False)
        # One queue per global crop, as the codes of each crop are computed separately.
        self.queues = nn.ModuleList([MemoryQueue(queue_length, proj_dim) for _ in range(N_GLOBAL)]
                                    if queue_length else [])
        self.temperature, self.epsilon, self.iterations = temperature, epsilon, sinkhorn_iterations
        self.freeze_prototypes_iters, self.gather = freeze_prototypes_iters, gather

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def check_run(self, n_train: int, batch_size: int, recipe: ViewRecipe) -> list[str]:
        problems = []
        k = self.prototypes.out_features
        if k > n_train:
            problems.append(f"{k} prototypes for {n_train} training images: equipartition would spread each "
                            f"batch over more clusters than there are images; lower method.params.num_prototypes")
        if len(recipe.globals_) != N_GLOBAL:
            problems.append(f"needs {N_GLOBAL} global views, the recipe has {len(recipe.globals_)}")
        if self.queues and self.queues[0].size > n_train:
            problems.append(f"queue_length {self.queues[0].size} exceeds the {n_train} training images")
        return problems

    def codes(self, scores: Tensor, crop: int, prototypes: Tensor) -> Tensor:
        """Sinkhorn codes (B, K) of one global crop's scores (B, K); with a full queue the transport runs on
        [queue; batch] (a larger set to equipartition) and only the batch rows are returned."""
        b = scores.shape[0]
        if self.queues and self.queues[crop].full:
            scores = torch.cat([self.queues[crop].contents().to(prototypes.dtype) @ prototypes.T, scores])
        return sinkhorn_knopp(scores, self.epsilon, self.iterations, gather=self.gather)[-b:]

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        return step_from_embeddings(self, views, progress)

    def embed(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """Every crop's l2-normalised projection, ``z`` (B, V, proj_dim)."""
        z = torch.cat([self.projector(self.backbone(x)) for _, x in group_by_size(views)])
        return {"z": by_sample(F.normalize(z, dim=1), views[0].shape[0])}

    def loss_from(self, emb: dict[str, Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        """Scores against the prototypes, Sinkhorn codes of the global crops over the whole batch, swapped
        prediction."""
        with torch.no_grad():  # prototypes live on the unit sphere, so scores are cosines
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        w = self.prototypes.weight
        if progress.step < self.freeze_prototypes_iters:
            # A zero gradient rather than none keeps DDP's reducer happy; with unit-norm rows, weight decay
            # only rescales them, so the prototypes stay put.
            w = w.detach() + 0.0 * w
        b, n_views = emb["z"].shape[:2]
        z = by_view(emb["z"])  # (V·B, D), view-major
        scores = (z @ w.T).view(n_views, b, -1)  # (V, B, K)
        with torch.no_grad():
            codes = torch.stack([self.codes(scores[g].detach().float(), g, w.detach().float())
                                 for g in range(N_GLOBAL)])
        loss = swav_loss(scores, codes, self.temperature)
        logs = {"z": z[:b].detach(), "z_pair": z[b : 2 * b].detach(),
                "code_entropy": -(codes * codes.clamp_min(1e-12).log()).sum(2).mean(),
                "queue_rows": z[: N_GLOBAL * b].detach()}  # the global crops' projections, queued in after_step
        return loss, logs

    def after_step(self, progress: Progress, logs: dict[str, Tensor]) -> None:
        if self.queues:
            for g, part in enumerate(logs["queue_rows"].chunk(N_GLOBAL)):
                self.queues[g].push(part)
