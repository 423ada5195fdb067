"""VICRegL: VICReg on the pooled representation plus VICReg between matched locations of the views' feature maps.

Bardes, Ponce, LeCun. VICRegL: Self-Supervised Learning of Local Visual Features, NeurIPS 2022, arXiv:2210.01571;
reference: facebookresearch/VICRegL ``main_vicregl.py``, ``transforms.py``, ``utils.py``.

One backbone pass per view (BN statistics of one view, as the reference) gives the pooled features and the last map
(:func:`~selfsup.nn.feature_maps.forward_maps`):

- global: the pooled features through the expander (Linear–BN–ReLU twice, then Linear; the reference's
  ``--mlp 8192-8192-8192``), VICReg's terms (:func:`~selfsup.losses.dense.vicregl_global_loss`);
- local: every map location through the maps projector (``--maps-mlp 512-512-512``, BN over all the view's
  locations), then VICReg's terms between location pairs matched by embedding (each location's L2 nearest
  neighbour in the other view's map, all kept) and by image position (each location's nearest location of the other
  view, from the crop boxes, the ``num_matches`` closest pairs kept), both directions; variance and covariance per
  match slot across the batch (:func:`~selfsup.losses.dense.vicregl_local_loss`).

Loss = α·global + (1 − α)·local, λ = μ = 25, ν = 1. ``alpha=None`` resolves by backbone: 0.75 for CNNs (the
reference's default and its README's ResNet-50 and ConvNeXt commands), 0.9 for selfsup's ViTs
(:func:`selfsup.nn.vit.is_vit`; the reference code has no ViT to take this from — its README lists α = 0.9
checkpoints beside the 0.75 ones for ResNet-50 and ConvNeXt, the weighting that favours the global criterion).
α = 1 builds no maps projector, α = 0 no expander (as the reference).

Views: the paper's ResNet recipe (2 crops of scale (0.08, 1), LARS lr 0.3) with VICReg's BYOL pair of pipelines
(saturation 0.2, as the reference's ``get_color_distortion``). Local crops are handled as the reference does
(pairs of one global view with every other view; ``num_matches[1]`` for the second view of a pair, the reference's
4 for its 3×3 local maps) when the views include them; the run builder gives local crops only to methods whose own
recipe has them, so today they reach VICRegL only when it is driven directly.

Deviations: the reference's default ``--no-flip-grid 1`` ignores horizontal flips when placing map cells in the
image, pairing mirrored locations in flipped views; here a flipped view's cells are mirrored (the view box's negative
width), so location matches are where the pixels are. Its online linear classifier on labels is left out (the loop
has no labels; evaluation probes the encoder separately), as is the ``--fast-vc-reg`` variant.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.losses.dense import flatten_map, grid_locations, vicregl_global_loss, vicregl_local_loss
from selfsup.losses.redundancy import check_vicreg_settings
from selfsup.methods.base import MethodSpec, Progress, step_from_embeddings
from selfsup.methods.registry import register
from selfsup.nn.feature_maps import forward_maps, map_levels
from selfsup.nn.heads import mlp
from selfsup.nn.vit import is_vit
from selfsup.views import ViewRecipe, byol_pair


@register("vicregl", "redundancy-reduction",
          "Bardes et al. 2022, VICRegL: Self-Supervised Learning of Local Visual Features, arXiv:2210.01571")
class VICRegL(nn.Module):
    spec = MethodSpec(
        views=byol_pair(saturation=0.2, scale=(0.08, 1.0)),
        needs_view_boxes=True,
        # 16 px through small_resnet [8, 16, 32]: 4×4 maps, 16 locations
        test_params={"proj_hidden": 32, "proj_dim": 32, "maps_hidden": 16, "maps_dim": 16, "num_matches": (6, 4)},
        micro_batches="embeddings",
    )

    def __init__(self, backbone: nn.Module, *, alpha: float | None = None, sim_weight: float = 25.0,
                 var_weight: float = 25.0, cov_weight: float = 1.0, gamma: float = 1.0, eps: float = 1e-4,
                 proj_hidden: int = 8192, proj_dim: int = 8192, proj_layers: int = 3, maps_hidden: int = 512,
                 maps_dim: int = 512, maps_layers: int = 3, num_matches: tuple[int, int] = (20, 4),
                 l2_all_matches: bool = True, gather: bool = False):
        super().__init__()
        check_vicreg_settings(sim_weight, var_weight, cov_weight, gamma, eps)
        alpha = (0.9 if is_vit(backbone) else 0.75) if alpha is None else alpha
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"vicregl: alpha (the global loss's share) must be in [0, 1], got {alpha}")
        if min(proj_layers, maps_layers) < 1:
            raise ValueError(f"vicregl: proj_layers and maps_layers must be ≥ 1, got {proj_layers} and {maps_layers}")
        if min(proj_hidden, proj_dim, maps_hidden, maps_dim) < 1:
            raise ValueError(f"vicregl: projector widths must be ≥ 1, got proj {proj_hidden}/{proj_dim}, maps "
                             f"{maps_hidden}/{maps_dim}")
        if len(num_matches) != 2 or min(num_matches) < 1:
            raise ValueError(f"vicregl: num_matches must be two integers ≥ 1 (for the first and the second view of a "
                             f"pair), got {num_matches}")
        self.backbone = backbone
        self.expander = self.maps_projector = None
        if alpha > 0:
            self.expander = mlp([backbone.num_features] + [proj_hidden] * (proj_layers - 1) + [proj_dim], norm="bn",
                                last_bias=False)
        if alpha < 1:
            channels = map_levels(backbone, backbone.in_chans, backbone.image_size)[-1].channels
            self.maps_projector = mlp([channels] + [maps_hidden] * (maps_layers - 1) + [maps_dim], norm="bn",
                                      last_bias=False)
        self.alpha = alpha
        self.weights = dict(sim_weight=sim_weight, var_weight=var_weight, cov_weight=cov_weight, gamma=gamma, eps=eps)
        self.num_matches, self.l2_all_matches = tuple(num_matches), l2_all_matches
        self.gather = gather

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, views: list[Tensor], progress: Progress,
                      boxes: list[Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        return step_from_embeddings(self, views, progress, boxes=boxes)

    def embed(self, views: list[Tensor], progress: Progress,
              boxes: list[Tensor] | None = None) -> dict[str, Tensor]:
        """Per view v: the expander's ``e{v}`` (B, proj_dim), the projected map vectors ``m{v}`` (B, N_v, maps_dim) and
        their image points ``loc{v}`` (B, N_v, 2), as the parts in use give them."""
        if boxes is None or len(boxes) != len(views):
            raise ValueError("vicregl: training_step needs boxes=, one (B, 4) crop box per view "
                             "(selfsup.views.make_views(..., with_boxes=True))")
        out: dict[str, Tensor] = {}
        for v, (x, box) in enumerate(zip(views, boxes)):  # one pass per view: BatchNorm statistics of one view
            pooled, (feature_map,) = forward_maps(self.backbone, x)
            if self.expander is not None:
                out[f"e{v}"] = self.expander(pooled)
            if self.maps_projector is not None:
                feats = flatten_map(feature_map)
                b, n, c = feats.shape
                out[f"m{v}"] = self.maps_projector(feats.reshape(b * n, c)).view(b, n, -1)
                out[f"loc{v}"] = grid_locations(box.float(), *feature_map.shape[-2:])
        return out

    def loss_from(self, emb: dict[str, Tensor], progress: Progress,
                  boxes: list[Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        n_views = sum(k.startswith("e" if self.expander is not None else "m") for k in emb)
        loss, logs = 0.0, {}
        if self.expander is not None:
            embeddings = [emb[f"e{v}"] for v in range(n_views)]
            global_loss, terms = vicregl_global_loss(embeddings, **self.weights, gather=self.gather)
            loss = loss + self.alpha * global_loss
            logs.update({f"global_{k}": v for k, v in terms.items()})
            logs.update(z=embeddings[0].detach(), z_pair=embeddings[1].detach())
        if self.maps_projector is not None:
            maps = [emb[f"m{v}"] for v in range(n_views)]
            locations = [emb[f"loc{v}"] for v in range(n_views)]
            local_loss, terms = vicregl_local_loss(maps, locations, self.num_matches, self.l2_all_matches,
                                                   **self.weights, gather=self.gather)
            loss = loss + (1 - self.alpha) * local_loss
            logs.update({f"local_{k}": v for k, v in terms.items()})
        return loss, logs

    def check_run(self, n_train: int, batch_size: int, recipe: ViewRecipe) -> list[str]:
        """``num_matches`` against the maps the recipe's views give: the first count is taken from a global view's
        locations, the second from any other view's (global or local)."""
        if self.maps_projector is None:
            return []
        own = self.backbone.image_size  # a recipe whose sizes are not resolved yet: the size the backbone was built for
        sizes = [a.size or own for a in recipe.globals_] + ([recipe.local.size or own] if recipe.local_crops else [])
        counts = {s: self._map_locations(s) for s in set(sizes)}
        if None in counts.values():
            return []  # the backbone's own check names the size it cannot take
        first, second = min(counts[s] for s in sizes[:2]), min(counts[s] for s in sizes)
        problems = []
        for count, most, where in ((self.num_matches[0], first, "the first view of a pair (a global view)"),
                                   (self.num_matches[1], second, "the second view of a pair (any other view)")):
            if count > most:
                problems.append(f"num_matches={list(self.num_matches)} keeps {count} location matches from {where}, "
                                f"whose map has only {most} locations at these view sizes; lower "
                                "method.params.num_matches")
        return problems

    @torch.no_grad()
    def _map_locations(self, size: int) -> int | None:
        """H·W of the backbone's last map at a size×size input (one dry run in eval mode: no BN statistics move);
        None where the backbone cannot take that size."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            device = next(self.backbone.parameters()).device
            _, (feature_map,) = forward_maps(self.backbone, torch.zeros(1, self.backbone.in_chans, size, size,
                                                                        device=device))
            return feature_map.shape[-2] * feature_map.shape[-1]
        except (RuntimeError, ValueError):
            return None
        finally:
            self.backbone.train(was_training)
