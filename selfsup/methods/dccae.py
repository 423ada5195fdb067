"""DCCAE: deep canonically correlated autoencoders on two augmented views of each image.

Wang, Arora, Livescu, Bilmes. On Deep Multi-View Representation Learning. ICML 2015 (extended version
arXiv:1602.01024), §2.4: encoders f, g map the two views to L-dimensional representations whose total canonical
correlation is maximised (Deep CCA, Andrew et al. 2013) while decoders p, q reconstruct each view's input from
its representation (an autoencoder per view):

    min  −corr(f(X), g(Y)) + λ/N Σ_i (‖x_i − p(f(x_i))‖² + ‖y_i − q(g(y_i))‖²)

with covariance regularisers r_x, r_y in the whitening (:func:`~selfsup.losses.cca.dccae_loss`). Here the two
views are two augmentations of one image, f = g by default (one encoder, as a siamese network; ``shared_encoder=False``
gives view 2 its own, as the paper's two modalities), f is the backbone followed by a projection MLP to k = L
dimensions (the representation the CCA and the decoder see), and each decoder is an MLP from those k dimensions
to the view's pixels, the normalised input the encoder saw. Evaluation uses the backbone's features, as every
method here.

Defaults are ours, not the paper's: it tunes L, λ, r_x and r_y per dataset on a grid and states no default.
- k = 32 (``proj_dim``): CCA's covariance of a batch needs B > k (the recipe's batch is 256, 8×), and Fashion-
  MNIST's 10 classes need far fewer directions than that;
- r1 = r2 = 1e-3: a small ridge that keeps the k×k whitening well conditioned on one batch (the correlations of
  an unregularised batch of 256 in 32 dimensions are biased upwards by chance alignment);
- λ = 0.01 (``lam``): the squared error of a 28×28 normalised view summed over its 784 pixels is ~800 per view at
  initialisation and a few hundred once trained, against a correlation term in [0, k = 32]: λ = 0.01 keeps the
  reconstruction term within an order of magnitude of the correlation (≈ 16 → ~5). The error grows with the
  pixel count, so scale λ by 784 / (C·H·W) for other image sizes;
- projection MLP D → 1024 → k and decoders k → 1024 → 1024 → C·H·W with ReLU (the paper's MNIST networks are
  fully connected with 1024-unit hidden layers).

The decoders' output size is fixed when the method is built (the backbone's input channels and size, which
``build_backbone`` records, or ``in_chans``/``image_size``): views of another size are refused by
:meth:`DCCAE.check_run` before training, as is a batch no larger than k.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from selfsup.distributed import world_size
from selfsup.losses.cca import dccae_loss
from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.registry import register
from selfsup.nn.heads import mlp
from selfsup.views import Augment, ViewRecipe


def _reinitialised(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with fresh weights wherever its layers can reset them (the second view's encoder)."""
    twin = copy.deepcopy(module)
    for m in twin.modules():
        if m is not twin and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return twin


@register("dccae", "redundancy-reduction", "Wang, Arora, Livescu, Bilmes 2015, On Deep Multi-View Representation "
          "Learning, ICML, arXiv:1602.01024")
class DCCAE(nn.Module):
    spec = MethodSpec(
        views=ViewRecipe(globals_=(Augment(), Augment())),
        min_batch_size=3,
        test_params={"proj_dim": 4, "proj_hidden": 32, "decoder_hidden": 32},
    )

    def __init__(self, backbone: nn.Module, *, proj_dim: int = 32, proj_hidden: int = 1024, decoder_hidden: int = 1024,
                 decoder_layers: int = 2, lam: float = 0.01, r1: float = 1e-3, r2: float = 1e-3,
                 shared_encoder: bool = True, in_chans: int | None = None, image_size: int | None = None,
                 gather: bool = False):
        super().__init__()
        built_chans, built_size = getattr(backbone, "in_chans", None), getattr(backbone, "image_size", None)
        if in_chans is not None and built_chans is not None and in_chans != built_chans:
            raise ValueError(f"dccae: in_chans={in_chans} but the backbone takes {built_chans}-channel images; the "
                             "decoders must reconstruct what the encoder sees (drop in_chans to use the backbone's)")
        chans, size = in_chans or built_chans, image_size or built_size
        if not isinstance(chans, int) or not isinstance(size, int):
            raise ValueError("dccae: the decoders need the input's channels and size, and this backbone does not "
                             "record them; pass in_chans= and image_size= (method.params)")
        if min(proj_dim, proj_hidden, decoder_hidden, decoder_layers) < 1:
            raise ValueError(f"dccae: proj_dim, proj_hidden, decoder_hidden and decoder_layers must be ≥ 1, got "
                             f"{proj_dim}, {proj_hidden}, {decoder_hidden}, {decoder_layers}")
        if lam < 0 or r1 < 0 or r2 < 0:
            raise ValueError(f"dccae: lam, r1 and r2 must be ≥ 0, got {lam}, {r1}, {r2}")
        self.backbone = backbone
        self.projector = mlp([backbone.num_features, proj_hidden, proj_dim], norm=None)
        self.backbone2 = None if shared_encoder else _reinitialised(backbone)
        self.projector2 = None if shared_encoder else _reinitialised(self.projector)
        pixels = chans * size * size
        self.decoder1 = mlp([proj_dim] + [decoder_hidden] * decoder_layers + [pixels], norm=None)
        self.decoder2 = mlp([proj_dim] + [decoder_hidden] * decoder_layers + [pixels], norm=None)
        self.input_shape = (chans, size, size)
        self.proj_dim, self.lam, self.r1, self.r2 = proj_dim, lam, r1, r2
        self.gather = gather

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def encode(self, x: Tensor, view: int) -> Tensor:
        """(B, C, H, W) → (B, k): the representation of view 1 (f) or view 2 (g, = f when shared)."""
        if view == 2 and self.backbone2 is not None:
            return self.projector2(self.backbone2(x))
        return self.projector(self.backbone(x))

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        x1, x2 = views
        if tuple(x1.shape[1:]) != self.input_shape or tuple(x2.shape[1:]) != self.input_shape:
            raise ValueError(f"dccae: the decoders reconstruct {self.input_shape} inputs, the views are "
                             f"{tuple(x1.shape[1:])} and {tuple(x2.shape[1:])}")
        n = x1.shape[0] * (world_size() if self.gather else 1)
        if n <= self.proj_dim:
            raise ValueError(f"dccae: CCA needs a batch larger than proj_dim = {self.proj_dim}, got {n}")
        if self.backbone2 is None:  # one encoder: both views through it together
            h1, h2 = self.encode(torch.cat([x1, x2]), 1).chunk(2)
        else:
            h1, h2 = self.encode(x1, 1), self.encode(x2, 2)
        recon1 = self.decoder1(h1).view_as(x1)
        recon2 = self.decoder2(h2).view_as(x2)
        loss, parts = dccae_loss(h1, h2, x1, recon1, x2, recon2, lam=self.lam, r1=self.r1, r2=self.r2,
                                 gather=self.gather)
        return loss, {**parts, "z": h1.detach(), "z_pair": h2.detach()}

    def check_run(self, n_train: int, batch_size: int, recipe: ViewRecipe) -> list[str]:
        problems = []
        if batch_size <= self.proj_dim:
            problems.append(f"CCA needs a batch larger than proj_dim = {self.proj_dim} (the k×k covariance of a batch "
                            f"of {batch_size} is singular or nearly); raise train.batch_size or lower method.params.proj_dim")
        c, size, _ = self.input_shape
        wrong = sorted({g.size for g in recipe.globals_ if g.size != size})
        if wrong:
            problems.append(f"the decoders reconstruct {size}×{size} images ({c} channel(s)) but the views are "
                            f"{', '.join(f'{s}px' for s in wrong)}; set method.params.image_size to the view size or "
                            f"views.size to {size}")
        return problems
