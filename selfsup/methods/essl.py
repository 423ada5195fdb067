"""E-SSL (E-SimCLR): SimCLR plus four-fold rotation prediction, invariance to the crops and colours and
equivariance to rotations in one backbone.

Dangovski, Jing, Loh, Han, Srivastava, Cheung, Agrawal, Soljačić. Equivariant Contrastive Learning.
ICLR 2022, arXiv:2111.00899. Rotation prediction: Gidaris et al. 2018, arXiv:1803.07728 (``rotation``).
Addepalli et al. 2022 (arXiv:2210.09866) add the same auxiliary task to joint-embedding methods because it
converges in far fewer epochs than they do: the regime of a short CPU budget.

Loss: ``NT-Xent(z1, z2) + rotation_weight · CE(rotation_head(backbone(rotated)), k)``. The rotation head is
an MLP on the pooled backbone features (the paper's code: two hidden layers with LayerNorm); the
projector and the NT-Xent loss are SimCLR's (:class:`~selfsup.methods.simclr.SimCLR`).

Where the rotated images come from (``rotate``):

- ``"crops"`` (the paper's): every local crop of the recipe in all four rotations. The paper's CIFAR setting
  is one extra crop at half the side of the global views (16 of 32 px) with the global views' augmentations
  and λ = 0.4, so rotation prediction costs about one more full-size view per image, not four.
- ``"views"``: no extra images. Each image's two global views are both turned by one random multiple of 90°
  and the head predicts it from both. The pair still differs only by the usual augmentations (rotation is
  neither an invariance of the contrastive task nor a negative), and the step costs what SimCLR's does.
  The recipe must then have no local crops (``views: {local_crops: 0}``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.methods.base import MethodSpec, Progress, by_sample
from selfsup.methods.registry import register
from selfsup.methods.rotation import ROTATIONS, rotate_all, rotate_each
from selfsup.methods.simclr import SimCLR
from selfsup.nn.heads import mlp
from selfsup.views import Augment, ViewRecipe

ROTATE_FROM = ("crops", "views")


@register("essl", "contrastive", "Dangovski et al. 2022, Equivariant Contrastive Learning (E-SimCLR: SimCLR + "
          "rotation prediction), arXiv:2111.00899")
class ESSL(SimCLR):
    spec = MethodSpec(
        views=ViewRecipe(globals_=(Augment(), Augment()), local_crops=1, local=Augment(scale=(0.2, 1.0)),
                         local_size_ratio=0.5),
        test_params={"proj_hidden": 32, "rotation_hidden": 32},
        micro_batches="embeddings",
    )

    def __init__(self, backbone: nn.Module, *, temperature: float = 0.5, proj_hidden: int = 2048,
                 proj_dim: int = 128, proj_layers: int = 2, rotation_weight: float = 0.4,
                 rotation_hidden: int = 2048, rotate: str = "crops", gather: bool = False):
        super().__init__(backbone, temperature=temperature, proj_hidden=proj_hidden, proj_dim=proj_dim,
                         proj_layers=proj_layers, gather=gather)
        if rotate not in ROTATE_FROM:
            raise ValueError(f"essl: rotate must be one of {', '.join(ROTATE_FROM)}, got {rotate!r}")
        if not rotation_weight > 0:
            raise ValueError(f"essl: rotation_weight must be > 0 (0 is plain SimCLR: method simclr), got {rotation_weight}")
        if rotation_hidden < 1:
            raise ValueError(f"essl: rotation_hidden must be ≥ 1, got {rotation_hidden}")
        self.rotation_head = mlp([backbone.num_features, rotation_hidden, rotation_hidden, ROTATIONS], norm="ln")
        self.rotation_weight = rotation_weight
        self.rotate = rotate

    def check_run(self, n_train: int, batch_size: int, recipe: ViewRecipe) -> list[str]:
        if self.rotate == "crops" and recipe.local_crops < 1:
            return ["essl with rotate: crops predicts the rotations of the local crops, and the recipe has none; "
                    "set views.local_crops ≥ 1, or method.params.rotate: views"]
        if self.rotate == "views" and recipe.local_crops:
            return [f"essl with rotate: views rotates the two global views and uses no local crops, but the recipe "
                    f"has {recipe.local_crops}; set views.local_crops: 0"]
        return []

    def embed(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """SimCLR's ``z1``, ``z2`` (B, proj_dim), and per image the rotation head's logits (B, R, 4) with their labels
        (B, R): R = 2 (its two views) with ``rotate: views``, 4 × the local crops with ``crops``."""
        x1, x2 = views[0], views[1]
        b = x1.shape[0]
        if self.rotate == "views":
            k = torch.randint(ROTATIONS, (b,), device=x1.device)
            feats = self.backbone(torch.cat([rotate_each(x1, k), rotate_each(x2, k)]))
            rot_feats, rot_labels = feats, k.repeat(2)
        else:
            crops, labels = rotate_all(torch.cat(views[2:]))  # every crop in all four rotations
            # one backbone call per image size (global views, then the crops)
            feats = self.backbone(torch.cat([x1, x2]))
            rot_feats, rot_labels = self.backbone(crops), labels
        z1, z2 = self.projector(feats).chunk(2)
        return {"z1": z1, "z2": z2, "rotation_logits": by_sample(self.rotation_head(rot_feats), b),
                "rotation_labels": by_sample(rot_labels, b)}

    def loss_from(self, emb: dict[str, Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        contrastive, logs = super().loss_from(emb, progress)
        logits, labels = emb["rotation_logits"].flatten(0, 1), emb["rotation_labels"].flatten(0, 1)
        rotation = F.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        return contrastive + self.rotation_weight * rotation, {
            "contrastive_loss": contrastive.detach(), "rotation_loss": rotation.detach(), "pretext_acc": acc.detach(),
            **logs}
