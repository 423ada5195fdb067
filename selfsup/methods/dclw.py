"""DCLW: DCL whose positive term is weighted by the negative von Mises–Fisher weight.

Yeh et al. Decoupled Contrastive Learning, ECCV 2022, arXiv:2110.06848 (§3.2, eq. 7):
``w_i = 2 − exp(s_i/σ) / E_j[exp(s_j/σ)]`` with ``s_i`` the cosine similarity of pair i and σ = 0.5,
which gives hard positives (far apart) a larger pull than easy ones; the weights average to 1.
Everything else is DCL's (``selfsup.methods.dcl``).
"""
from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from selfsup.losses.contrastive import dcl_loss, vmf_weights
from selfsup.methods.dcl import DCL
from selfsup.methods.registry import register


@register("dclw", "contrastive", "Yeh et al. 2022, Decoupled Contrastive Learning (weighted), arXiv:2110.06848")
class DCLW(DCL):
    def __init__(self, backbone: nn.Module, *, temperature: float = 0.1, sigma: float = 0.5,
                 proj_hidden: int = 2048, proj_dim: int = 128, proj_layers: int = 2, gather: bool = False):
        super().__init__(backbone, temperature=temperature, proj_hidden=proj_hidden, proj_dim=proj_dim,
                         proj_layers=proj_layers, gather=gather)
        if sigma <= 0:
            raise ValueError(f"dclw: sigma must be > 0, got {sigma}")
        self.sigma = sigma

    def loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        weights = partial(vmf_weights, sigma=self.sigma, gather=self.gather)
        return dcl_loss(z1, z2, self.temperature, weight_fn=weights, gather=self.gather)
