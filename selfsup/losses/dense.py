"""Dense (per-location) losses and the matching of feature-map locations across two views: DenseCL and VICRegL.

DenseCL (Wang, Zhang, Shen, Kong, Li. Dense Contrastive Learning for Self-Supervised Visual Pre-Training, CVPR
2021, arXiv:2011.09157): each location of the query view's map is matched to the key view's location whose backbone
feature is most similar (cosine), and the pair is contrasted, InfoNCE, against a queue of whole-image dense keys.

VICRegL (Bardes, Ponce, LeCun. VICRegL: Self-Supervised Learning of Local Visual Features, NeurIPS 2022,
arXiv:2210.01571): locations of two views' maps are paired twice, by their embeddings (each location's nearest
neighbour in the other map) and by where they lie in the image (each location's nearest location of the other view,
from the crop boxes), and each set of pairs gets VICReg's three terms, the variance and covariance taken per match
slot across the batch. Everything follows the authors' ``main_vicregl.py`` (``_vicreg_loss``, ``_local_loss``,
``local_loss``, ``global_loss``, ``neirest_neighbores``).

Shapes: a map of N = H·W locations is (B, N, C), its locations row-major (index i·W + j for row i, column j).
Matching draws no gradient (it selects indices); the losses are differentiable in the selected vectors.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.distributed import gather as gather_ranks
from selfsup.losses.contrastive import info_nce
from selfsup.losses.precision import fp32_loss
from selfsup.losses.redundancy import check_vicreg_settings, covariance_loss, invariance_loss, variance_loss


def take_locations(maps: Tensor, index: Tensor) -> Tensor:
    """(B, N, C) maps, (B, K) location indices → (B, K, C): row ``index[b, k]`` of image b's map."""
    return maps.gather(1, index.unsqueeze(-1).expand(-1, -1, maps.shape[-1]))


def flatten_map(feature_map: Tensor) -> Tensor:
    """(B, C, H, W) → (B, H·W, C), locations row-major (the reference codes' ``view(B, C, -1)`` order)."""
    return feature_map.flatten(2).transpose(1, 2)


# --- DenseCL ----------------------------------------------------------------------------------------

@torch.no_grad()
@fp32_loss  # an argmax over bf16 similarities would pick among rounding ties
def match_by_cosine(query_feats: Tensor, key_feats: Tensor) -> Tensor:
    """DenseCL's correspondence (arXiv:2011.09157, §3.3): (B, N, C) query and (B, M, C) key *backbone* features →
    (B, N), for each query location the key location of highest cosine similarity (the reference's
    ``backbone_sim_matrix.max(dim=2)[1]``; ties go to the lowest index)."""
    sim = F.normalize(query_feats, dim=-1) @ F.normalize(key_feats, dim=-1).transpose(1, 2)  # (B, N, M)
    return sim.argmax(dim=-1)


def densecl_dense_loss(query: Tensor, positive: Tensor, temperature: float, negatives: Tensor,
                       own_rows: Sequence[int] | None = None) -> Tensor:
    """DenseCL's dense InfoNCE (arXiv:2011.09157, eq. 2), the mean over the B·N query locations of
    ``−log exp(r·t⁺/τ) / (exp(r·t⁺/τ) + Σ_k exp(r·t⁻_k/τ))`` (all vectors l2-normalised by :func:`info_nce`).

    query: (B, N, D) dense projections of the query view; positive: (B, N, D) the matched key dense projection of
    each location (``take_locations(k_dense, match_by_cosine(...))``); negatives: (K, D), shared by every location
    (the queue of per-image pooled dense keys). ``own_rows``: for the in-batch form (no queue yet), negatives holds
    one row per image of the (global) batch and ``own_rows[b]`` is image b's own, left out of its negatives.
    """
    if query.ndim != 3 or query.shape != positive.shape:
        raise ValueError(f"densecl: expected (B, N, D) queries and positives of one shape, got {tuple(query.shape)} "
                         f"and {tuple(positive.shape)}")
    if own_rows is None:
        return info_nce(query.flatten(0, 1), positive.flatten(0, 1), temperature, negatives=negatives, in_batch=False)
    if len(own_rows) != query.shape[0]:
        raise ValueError(f"densecl: own_rows names {len(own_rows)} rows for {query.shape[0]} images")
    # Every image has N locations, so the mean of the per-image means is the mean over all B·N locations.
    return torch.stack([info_nce(query[b], positive[b], temperature, in_batch=False,
                                 negatives=torch.cat([negatives[:r], negatives[r + 1:]]))
                        for b, r in enumerate(own_rows)]).mean()


# --- VICRegL: matching ------------------------------------------------------------------------------

def grid_locations(boxes: Tensor, height: int, width: int) -> Tensor:
    """(B, 4) view boxes → (B, H·W, 2): the image point (x, y) of the centre of each cell of the view's H×W map,
    row-major. A box is (centre x, centre y, width, height) with the width negative for a mirrored view (as
    :func:`selfsup.views.make_views` gives it): cell (i, j) is view point u = (j + ½)/W, v = (i + ½)/H, image point
    (cx + (u − ½)·w, cy + (v − ½)·h). The reference (``transforms._location_to_NxN_grid``) builds the same grid in
    pixels; its default ``--no-flip-grid 1`` ignores flips, which this does not (a mirrored view's cells are
    mirrored)."""
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"view boxes must be (B, 4) (centre x, centre y, width, height), got {tuple(boxes.shape)}")
    u = (torch.arange(width, device=boxes.device, dtype=boxes.dtype) + 0.5) / width - 0.5
    v = (torch.arange(height, device=boxes.device, dtype=boxes.dtype) + 0.5) / height - 0.5
    cx, cy, w, h = boxes.unbind(1)
    x = cx[:, None] + u * w[:, None]  # (B, W)
    y = cy[:, None] + v * h[:, None]  # (B, H)
    grid = torch.stack([x[:, None, :].expand(-1, height, -1), y[:, :, None].expand(-1, -1, width)], dim=-1)
    return grid.flatten(1, 2)


@torch.no_grad()
def nearest_matches(distances: Tensor, num_matches: int | None = None) -> tuple[Tensor, Tensor]:
    """VICRegL's ``neirest_neighbores``: (B, N, M) distances from N source to M candidate locations →
    (source, target), each (B, K) location indices: every source location's nearest candidate, then the
    K = ``num_matches`` pairs of smallest distance kept (None: all N), listed in source-location order (the order
    the reference's ``masked_select`` leaves them in, which fixes what each match slot holds across the batch).
    Ties go to the lowest index."""
    b, n, _ = distances.shape
    nearest_dist, nearest = distances.min(dim=-1)  # (B, N)
    if num_matches is None:
        return torch.arange(n, device=distances.device).expand(b, n), nearest
    if not 1 <= num_matches <= n:
        raise ValueError(f"vicregl: num_matches={num_matches} must be 1–{n}, the number of locations of the map "
                         "it is taken from")
    source = nearest_dist.argsort(dim=1, stable=True)[:, :num_matches].sort(dim=1).values
    return source, nearest.gather(1, source)


def l2_matches(maps_a: Tensor, maps_b: Tensor, num_matches: int | None = None) -> tuple[Tensor, Tensor]:
    """Feature-based matching (``neirest_neighbores_on_l2``): (B, N, C), (B, M, C) → matched (B, K, C) pairs
    (rows of ``maps_a``, their nearest rows of ``maps_b`` in L2)."""
    source, target = nearest_matches(torch.cdist(maps_a.detach(), maps_b.detach()), num_matches)
    return take_locations(maps_a, source), take_locations(maps_b, target)


def location_matches(maps_a: Tensor, maps_b: Tensor, locations_a: Tensor, locations_b: Tensor,
                     num_matches: int) -> tuple[Tensor, Tensor]:
    """Location-based matching (``neirest_neighbores_on_location``): (B, N, C), (B, M, C) maps with their
    (B, N, 2), (B, M, 2) image points → matched (B, K, C) pairs: the K locations of ``maps_a`` closest in the image
    to a location of ``maps_b``, with that location's row."""
    source, target = nearest_matches(torch.cdist(locations_a, locations_b), num_matches)
    return take_locations(maps_a, source), take_locations(maps_b, target)


# --- VICRegL: losses --------------------------------------------------------------------------------

def local_vicreg_terms(x: Tensor, y: Tensor, gamma: float = 1.0, eps: float = 1e-4,
                       gather: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The reference's ``_vicreg_loss`` on (B, K, C) matched pairs, unweighted: (invariance, variance, covariance).

    Invariance: the MSE over all B·K·C entries. Variance and covariance: for each of the K match slots, over the
    batch (the slot holds one location per image), then averaged over slots and over the two sides x, y (the
    covariance too is averaged over the sides here, where VICReg sums it). ``gather``: the batch statistics over
    every process's images (the reference's ``gather_center``), with gradients; the invariance stays local.
    """
    if x.ndim != 3 or x.shape != y.shape:
        raise ValueError(f"vicregl: expected two (B, K, C) sets of matched vectors, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    inv = invariance_loss(x, y)
    if gather:
        x, y = gather_ranks(x), gather_ranks(y)
    if x.shape[0] < 2:
        raise ValueError(f"vicregl: batch statistics need at least 2 images, got {x.shape[0]}")
    xs, ys = x.transpose(0, 1), y.transpose(0, 1)  # (K, B, C): one batch of B vectors per match slot
    var = (variance_loss(xs, gamma, eps) + variance_loss(ys, gamma, eps)) / 2
    cov = (covariance_loss(xs) + covariance_loss(ys)) / 2
    return inv, var, cov


def _pair_terms(maps_a: Tensor, maps_b: Tensor, loc_a: Tensor, loc_b: Tensor, num_matches: tuple[int, int],
                l2_all_matches: bool, gamma: float, eps: float, gather: bool) -> Tensor:
    """The reference's ``_local_loss`` of one view pair: (3,) unweighted (inv, var, cov), each the mean of its a→b
    and b→a terms under feature matching plus the same under location matching. a→b keeps ``num_matches[0]``
    pairs, b→a ``num_matches[1]``."""
    l2_counts = (None, None) if l2_all_matches else num_matches
    total = maps_a.new_zeros(3)
    for pairs_ab, pairs_ba in (
            (l2_matches(maps_a, maps_b, l2_counts[0]), l2_matches(maps_b, maps_a, l2_counts[1])),
            (location_matches(maps_a, maps_b, loc_a, loc_b, num_matches[0]),
             location_matches(maps_b, maps_a, loc_b, loc_a, num_matches[1]))):
        ab = torch.stack(local_vicreg_terms(*pairs_ab, gamma, eps, gather))
        ba = torch.stack(local_vicreg_terms(*pairs_ba, gamma, eps, gather))
        total = total + (ab + ba) / 2
    return total


def _view_pairs(num_views: int) -> list[tuple[int, int]]:
    """(i, j) for i in the two global views and j any other view (the reference's ``for i in range(2): for j ≠ i``)."""
    return [(i, j) for i in range(min(2, num_views)) for j in range(num_views) if j != i]


def _weighted(terms: Tensor, sim_weight: float, var_weight: float, cov_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    inv, var, cov = terms.unbind()
    loss = sim_weight * inv + var_weight * var + cov_weight * cov
    return loss, {"invariance": inv.detach(), "variance": var.detach(), "covariance": cov.detach()}


@fp32_loss
def vicregl_local_loss(maps: Sequence[Tensor], locations: Sequence[Tensor], num_matches: tuple[int, int] = (20, 4),
                       l2_all_matches: bool = True, sim_weight: float = 25.0, var_weight: float = 25.0,
                       cov_weight: float = 1.0, gamma: float = 1.0, eps: float = 1e-4,
                       gather: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """VICRegL's local criterion (arXiv:2210.01571, §3.2; ``local_loss`` of the reference), averaged over the view
    pairs (i, j), i one of the two global views and j any other view.

    maps: per view (B, N_v, C) projected map vectors (the maps projector on every location); locations: per view
    (B, N_v, 2) image points of those locations (:func:`grid_locations`). ``num_matches`` = (for the first view of
    a pair, for the second): how many location-based pairs each direction keeps (the reference's 20 and 4 for 7×7
    global and 3×3 local maps); ``l2_all_matches`` keeps every feature-based pair (the reference's default),
    otherwise ``num_matches`` too. Weights λ, μ, ν and γ, ε as VICReg's. Returns the loss and its unweighted terms.
    """
    check_vicreg_settings(sim_weight, var_weight, cov_weight, gamma, eps)
    if len(maps) < 2 or len(maps) != len(locations):
        raise ValueError(f"vicregl: need at least two views' maps, each with its locations; got {len(maps)} maps "
                         f"and {len(locations)} location grids")
    pairs = _view_pairs(len(maps))
    terms = sum(_pair_terms(maps[i], maps[j], locations[i], locations[j], num_matches, l2_all_matches, gamma, eps,
                            gather) for i, j in pairs) / len(pairs)
    return _weighted(terms, sim_weight, var_weight, cov_weight)


@fp32_loss
def vicregl_global_loss(embeddings: Sequence[Tensor], sim_weight: float = 25.0, var_weight: float = 25.0,
                        cov_weight: float = 1.0, gamma: float = 1.0, eps: float = 1e-4,
                        gather: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """VICRegL's global criterion (``global_loss`` of the reference): VICReg on per-view (B, D) expander outputs.

    Invariance: the MSE averaged over the pairs (i, j), i one of the two global views, j any other. Variance and
    covariance: averaged over every view. With two views this is :func:`~selfsup.losses.redundancy.vicreg_loss`
    except that the covariance term is the *mean* of the views' c(·) where VICReg's code sums them (so ν weighs
    half as much). ``gather``: batch statistics over every process (the invariance stays local).
    """
    check_vicreg_settings(sim_weight, var_weight, cov_weight, gamma, eps)
    if len(embeddings) < 2:
        raise ValueError(f"vicregl: need at least two views' embeddings, got {len(embeddings)}")
    pairs = _view_pairs(len(embeddings))
    inv = sum(invariance_loss(embeddings[i], embeddings[j]) for i, j in pairs) / len(pairs)
    every = [gather_ranks(z) if gather else z for z in embeddings]
    var = sum(variance_loss(z, gamma, eps) for z in every) / len(every)
    cov = sum(covariance_loss(z) for z in every) / len(every)
    return _weighted(torch.stack([inv, var, cov]), sim_weight, var_weight, cov_weight)
