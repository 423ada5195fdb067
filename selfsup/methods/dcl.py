"""DCL: SimCLR with the decoupled contrastive loss (the positive pair left out of the denominator).

Yeh, Hong, Hsu, Liu, Chen, LeCun. Decoupled Contrastive Learning, ECCV 2022, arXiv:2110.06848 (eq. 6).

Removing the positive from NT-Xent's denominator removes the negative–positive coupling factor that
shrinks the gradient for easy positives and small batches (§3.1), so DCL needs neither large batches
nor a momentum encoder. Architecture and views are SimCLR's (``selfsup.methods.simclr``, arXiv:2002.05709:
2-layer MLP projector with BN, hidden 2048, output 128); only the loss differs, with τ = 0.1 as in the
paper's and lightly's DCL setting.
"""
from __future__ import annotations

from torch import Tensor, nn

from selfsup.losses.contrastive import dcl_loss
from selfsup.methods.registry import register
from selfsup.methods.simclr import SimCLR


@register("dcl", "contrastive", "Yeh et al. 2022, Decoupled Contrastive Learning, arXiv:2110.06848")
class DCL(SimCLR):
    def __init__(self, backbone: nn.Module, *, temperature: float = 0.1, proj_hidden: int = 2048,
                 proj_dim: int = 128, proj_layers: int = 2, gather: bool = False):
        super().__init__(backbone, temperature=temperature, proj_hidden=proj_hidden, proj_dim=proj_dim,
                         proj_layers=proj_layers, gather=gather)

    def loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        return dcl_loss(z1, z2, self.temperature, gather=self.gather)
