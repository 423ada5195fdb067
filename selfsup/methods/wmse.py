"""W-MSE: whiten the batch of embeddings, then pull the whitened positives together.

Ermolov, Siarohin, Sangineto, Sebe. Whitening for Self-Supervised Representation Learning.
ICML 2021, arXiv:2007.06346.

Whitening scatters the embeddings of each sub-batch over the sphere (identity covariance), so a
plain MSE between positives cannot collapse them and no negatives are needed. Paper defaults
(CIFAR setting): a projection head Linear–BN–ReLU–Linear with 1024 hidden units and a
64-dimensional embedding, whitening sub-batches of ``w_size`` = 128 samples, ``w_iter`` = 1
(W-MSE 2: two positives), Adam with lr 3·10⁻³ and weight decay 10⁻⁶.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.losses.redundancy import wmse_loss
from selfsup.methods.base import MethodSpec, Progress, step_from_embeddings
from selfsup.methods.registry import register
from selfsup.nn.heads import mlp
from selfsup.distributed import world_size
from selfsup.views import Augment, ViewRecipe

# The paper's CIFAR augmentations: crops of 20–100% of the image, colour jitter, 10% grayscale, no blur.
_VIEW = Augment(scale=(0.2, 1.0), gray_p=0.1, blur_p=0.0)


@register("wmse", "redundancy-reduction",
          "Ermolov et al. 2021, Whitening for Self-Supervised Representation Learning, arXiv:2007.06346")
class WMSE(nn.Module):
    spec = MethodSpec(
        views=ViewRecipe(globals_=(_VIEW, _VIEW)),
        test_params={"proj_hidden": 32, "proj_dim": 8, "w_size": 16},
        micro_batches="embeddings",
    )

    def __init__(self, backbone: nn.Module, *, w_size: int = 128, w_iter: int = 1, eps: float = 1e-4,
                 proj_hidden: int = 1024, proj_dim: int = 64, gather: bool = False):
        super().__init__()
        if proj_hidden < 1 or proj_dim < 1:
            raise ValueError(f"wmse: projector widths must be ≥ 1, got {proj_hidden} and {proj_dim}")
        if w_size <= proj_dim:
            raise ValueError(f"wmse: the whitening sub-batch w_size={w_size} must be larger than the embedding "
                             f"dimension proj_dim={proj_dim} (whitening needs a full-rank covariance)")
        if w_iter < 1:
            raise ValueError(f"wmse: w_iter must be ≥ 1, got {w_iter}")
        if eps < 0:
            raise ValueError(f"wmse: eps must be ≥ 0, got {eps}")
        self.backbone = backbone
        self.projector = mlp([backbone.num_features, proj_hidden, proj_dim], norm="bn")
        self.w_size, self.w_iter, self.eps = w_size, w_iter, eps
        self.gather = gather

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def check_run(self, n_train: int, batch_size: int, recipe: ViewRecipe) -> list[str]:
        problems = []
        # Without gather each process whitens its own share of the batch.
        whitened = batch_size if self.gather else batch_size // world_size()
        if whitened < self.w_size:
            where = "" if self.gather or world_size() == 1 else f" per process ({world_size()} processes)"
            problems.append(f"batch of {whitened}{where} is smaller than the whitening sub-batch "
                            f"w_size={self.w_size}; raise train.batch_size or lower method.params.w_size "
                            f"(it must stay above proj_dim={self.projector[-1].out_features})")
        return problems

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        return step_from_embeddings(self, views, progress)

    def embed(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """The two views' projections ``z1``, ``z2`` (B, proj_dim)."""
        x1, x2 = views
        z1, z2 = self.projector(self.backbone(torch.cat([x1, x2]))).chunk(2)
        return {"z1": z1, "z2": z2}

    def loss_from(self, emb: dict[str, Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        z1, z2 = emb["z1"], emb["z2"]
        # covariances and their Cholesky factors are computed in fp32 inside, even under autocast
        loss = wmse_loss(z1, z2, self.w_size, self.w_iter, self.eps, gather=self.gather)
        return loss, {"z": z1.detach(), "z_pair": z2.detach()}
