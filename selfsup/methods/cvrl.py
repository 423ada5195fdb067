"""CVRL: SimCLR on two clips of one video, spaced by temporal interval sampling.

Qian, Meng, Gong, Yang, Wang, Belongie, Cui. Spatiotemporal Contrastive Video Representation Learning, CVPR 2021,
arXiv:2008.03800.

The image method's parts, unchanged: SimCLR's projector and NT-Xent (:class:`selfsup.methods.simclr.SimCLR`, with
its ``gather`` for negatives from every process). What is video here is the views (:class:`ClipRecipe`):

- temporal interval sampling (§3.1): the distance between the two clips' starts is drawn from a monotonically
  decreasing distribution, the density ∝ 1 − (d/M)^p (p = 1, linear) of the public implementation, then the
  earlier start uniformly (``views.interval: decreasing``, ``views.interval_power``;
  :func:`selfsup.views.clips.interval_probabilities`);
- temporally consistent spatial augmentation (§3.2): one crop, flip and colour draw per clip, the same on every
  frame (what every :class:`ClipRecipe` does);
- a 3D backbone (``small_r3d`` by default on CPUs; the paper's is R3D-50) maps a clip (B, C, T, H, W) to (B, F).

Defaults follow the paper and its public config (tensorflow/models official/projects/video_ssl): τ = 0.1; a
projector of three hidden layers of 2048 with BN and ReLU and a 128-wide output (``proj_layers = 4`` linear layers);
the paper's clips are 16 frames 2 apart, which span 31 frames; the recipe's default here is the library's clip
(8 frames 2 apart, which fits 16-frame records) and each config sets what its data allows.
"""
from __future__ import annotations

from torch import nn

from selfsup.methods.base import MethodSpec
from selfsup.methods.registry import register
from selfsup.methods.simclr import SimCLR
from selfsup.views.clips import ClipRecipe


@register("cvrl", "contrastive",
          "Qian et al. 2021, Spatiotemporal Contrastive Video Representation Learning, arXiv:2008.03800")
class CVRL(SimCLR):
    spec = MethodSpec(
        views=ClipRecipe(clips=2, interval="decreasing"),
        inputs="clips",
        default_backbone="small_r3d",
        test_params={"proj_hidden": 32, "proj_dim": 16},
        micro_batches="embeddings",
    )

    def __init__(self, backbone: nn.Module, *, temperature: float = 0.1, proj_hidden: int = 2048,
                 proj_dim: int = 128, proj_layers: int = 4, gather: bool = False):
        super().__init__(backbone, temperature=temperature, proj_hidden=proj_hidden, proj_dim=proj_dim,
                         proj_layers=proj_layers, gather=gather)
