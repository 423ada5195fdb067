"""Shared parts of the temporal pretext tasks (arrow of time, VCOP, OPN, Shuffle and Learn): order labels, motion
measures, frame gathering, frame embeddings and the pairwise order head.

Those methods make labels from time itself: a clip played backwards, clips or frames shuffled by a permutation.
What each needs beyond its own few lines lives here, once:

- permutations and their class labels: :func:`order_permutations` (all n! orders, the VCOP classes) and
  :func:`reversal_classes` (n!/2 classes, a permutation and its reverse one class: OPN), :func:`permutation_index`
  (the class of given permutations), :func:`apply_order` (items shuffled by a permutation per sample);
- motion: :func:`frame_motion` / :func:`motion_energy`, the mean absolute frame difference, the one motion measure
  (the papers use optical-flow magnitude; frame differences are the cheap proxy, computed on the device), and
  :func:`sample_motion_windows`, window starts drawn in proportion to their motion (high-motion windows, as
  Shuffle and Learn and OPN pick them by flow);
- :func:`gather_frames`: frames at given positions, (B, C, T, H, W) → (B, K, C, H, W);
- :func:`frame_embeddings`: one feature per frame from any video backbone (a per-frame encoder's
  ``frame_features``, else every frame as a one-frame clip);
- :class:`PairwiseOrderHead`: the pairwise feature extraction of OPN (Lee et al. 2017, arXiv:1708.01246 §3.2),
  reused by VCOP (Xu et al. 2019): every pair of item features concatenated through one shared layer, all pairs
  concatenated, a linear classifier over the orders;
- :func:`balanced_labels` (exactly a given share of a batch positive, at random places) and
  :func:`kept_cross_entropy` (a cross-entropy over the samples a motion filter kept).
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.nn.heads import mlp
from selfsup.views import Augment
from selfsup.views.clips import ClipRecipe


def frame_window_views() -> ClipRecipe:
    """The views of the frame-order tasks (OPN, Shuffle and Learn): one 16-frame window at the records' own rate,
    from which the method picks its frames, with crop and flip only (colour carries no order)."""
    return ClipRecipe(clip_len=16, stride=1, clips=1,
                      augment=Augment(scale=(0.5, 1.0), flip_p=0.5, jitter_p=0.0, hue=0.0, saturation=0.0, gray_p=0.0,
                                      blur_p=0.0))

# ------------------------------------------------------------------------------------- orders and labels


def order_permutations(n: int) -> Tensor:
    """All n! permutations of 0..n−1 in lexicographic order, (n!, n) int64: row k is class k of an n-item order task."""
    if n < 2:
        raise ValueError(f"an order task needs at least 2 items, got {n}")
    return torch.tensor(list(itertools.permutations(range(n))), dtype=torch.int64)


def reversal_classes(n: int) -> tuple[Tensor, Tensor]:
    """OPN's classes: a permutation and its reverse are one class (playing a sequence backwards keeps its sense).

    Returns ``canonical`` (n!/2, n), one representative per class (the lexicographically smaller of p and reversed
    p, classes in lexicographic order of it), and ``class_of`` (n!,): the class of each row of
    :func:`order_permutations` ``(n)``.
    """
    perms = order_permutations(n).tolist()
    canonical = sorted({min(tuple(p), tuple(reversed(p))) for p in perms})
    index = {p: k for k, p in enumerate(canonical)}
    class_of = [index[min(tuple(p), tuple(reversed(p)))] for p in perms]
    return torch.tensor(canonical, dtype=torch.int64), torch.tensor(class_of, dtype=torch.int64)


def permutation_index(perms: Tensor, p: Tensor) -> Tensor:
    """The row of ``perms`` (P, n) equal to each of ``p`` (B, n) → (B,) int64; an error if one is not there."""
    match = (p[:, None, :] == perms[None, :, :].to(p.device)).all(dim=2)  # (B, P)
    if not bool(match.any(dim=1).all()):
        raise ValueError("permutation_index: some rows are not permutations of the set")
    return match.int().argmax(dim=1)


def apply_order(items: Tensor, order: Tensor) -> Tensor:
    """Items (B, K, …) rearranged per sample: ``out[b, k] = items[b, order[b, k]]`` (order (B, K) int64)."""
    b = torch.arange(items.shape[0], device=items.device)[:, None]
    return items[b, order.to(items.device)]


def balanced_labels(batch: int, fraction: float, device: torch.device | str | None = None) -> Tensor:
    """(B,) bool with exactly round(fraction·B) True at uniformly random positions (a balanced binary task per step)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the share of positives must be in [0, 1], got {fraction}")
    flags = torch.zeros(batch, dtype=torch.bool, device=device)
    flags[torch.randperm(batch, device=device)[: round(fraction * batch)]] = True
    return flags


# ----------------------------------------------------------------------------------------------- motion


def frame_motion(x: Tensor) -> Tensor:
    """Clips (B, C, T, H, W) → (B, T − 1): mean |x_{t+1} − x_t| over channels and pixels, step by step.

    The motion measure of these tasks: the papers rank windows by optical-flow magnitude (Misra et al. 2016; Lee et
    al. 2017) or drop static videos by flow (Wei et al. 2018); the frame difference is zero exactly where nothing
    moves and grows with moving area and contrast, which is what those filters need, at no cost.
    """
    if x.dim() != 5:
        raise ValueError(f"frame_motion takes clips (B, C, T, H, W), got shape {tuple(x.shape)}")
    return (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(1, 3, 4))


def motion_energy(x: Tensor) -> Tensor:
    """Clips (B, C, T, H, W) → (B,): the mean frame-to-frame motion over the clip (0 for one-frame clips)."""
    steps = frame_motion(x)
    return steps.mean(dim=1) if steps.shape[1] else steps.new_zeros(x.shape[0])


def sample_motion_windows(x: Tensor, span: int) -> tuple[Tensor, Tensor]:
    """Starts (B,) int64 of ``span``-frame windows of clips (B, C, T, H, W), drawn with probability proportional to
    each window's motion (the mean of its span − 1 frame steps), and that motion (B,).

    High-motion windows are favoured as the papers do with flow; a clip with no motion anywhere draws uniformly
    (its motion, 0, lets a filter drop it).
    """
    t = x.shape[2]
    if not 1 <= span <= t:
        raise ValueError(f"a window of {span} frames does not fit clips of {t} frames")
    if span == 1:
        starts = torch.randint(0, t, (x.shape[0],), device=x.device)
        return starts, x.new_zeros(x.shape[0])
    steps = frame_motion(x.detach())  # (B, T − 1)
    windows = steps.unfold(1, span - 1, 1).mean(dim=2)  # (B, T − span + 1)
    weights = windows + (windows.sum(dim=1, keepdim=True) == 0).to(windows.dtype)  # static clip: uniform
    starts = torch.multinomial(weights.float(), 1).squeeze(1)
    return starts, windows.gather(1, starts[:, None]).squeeze(1)


# ------------------------------------------------------------------------------------------------ frames


def gather_frames(x: Tensor, positions: Tensor) -> Tensor:
    """Clips (B, C, T, H, W) and frame positions (B, K) int64 → frames (B, K, C, H, W):
    ``out[b, k] = x[b, :, positions[b, k]]``."""
    b = torch.arange(x.shape[0], device=x.device)[:, None]
    return x.transpose(1, 2)[b, positions.to(x.device)]


def frame_embeddings(backbone: nn.Module, frames: Tensor) -> Tensor:
    """One feature per frame: frames (B, K, C, H, W) → (B, K, D), all B·K frames in one backbone call.

    A per-frame encoder (``selfsup.nn.video.PerFrame``) gives them through ``frame_features`` ((B, C, T, H, W) →
    (B, T, D)); any other video backbone sees each frame as a one-frame clip (B·K, C, 1, H, W), or as a still clip
    of ``backbone.min_frames`` copies of it where the network needs more frames than one.
    """
    if frames.dim() != 5:
        raise ValueError(f"frame_embeddings takes frames (B, K, C, H, W), got shape {tuple(frames.shape)}")
    b, k = frames.shape[:2]
    per_frame = getattr(backbone, "frame_features", None)
    if callable(per_frame):
        return per_frame(frames.transpose(1, 2))
    clips = frames.flatten(0, 1).unsqueeze(2)  # (B·K, C, 1, H, W)
    need = int(getattr(backbone, "min_frames", 1) or 1)
    if need > 1:
        clips = clips.expand(-1, -1, need, -1, -1)
    return backbone(clips).unflatten(0, (b, k))


# -------------------------------------------------------------------------------------------------- head


class PairwiseOrderHead(nn.Module):
    """Pairwise feature extraction and order classification (OPN, Lee et al. 2017, arXiv:1708.01246 §3.2; VCOP,
    Xu et al. 2019 §3.2): items (B, K, D) → logits (B, num_classes).

    Optionally a shared per-item layer first (``item_dim``: OPN's fc6 on each frame's features), then for every pair
    i < j (K(K−1)/2 of them, in :func:`itertools.combinations` order) the concatenation [f_i, f_j] through one shared
    Linear + ReLU of ``pair_dim`` (fc7), the pairs concatenated, dropout, and a linear classifier (fc8). Which item
    comes first in a pair carries the order, so the pair layer is not symmetric on purpose.
    """

    def __init__(self, in_dim: int, items: int, num_classes: int, *, pair_dim: int = 512,
                 item_dim: int | None = None, dropout: float = 0.5):
        super().__init__()
        if items < 2 or min(in_dim, num_classes, pair_dim) < 1 or (item_dim is not None and item_dim < 1):
            raise ValueError(f"PairwiseOrderHead: items ≥ 2 and positive widths needed, got items={items}, "
                             f"in_dim={in_dim}, pair_dim={pair_dim}, item_dim={item_dim}, classes={num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"PairwiseOrderHead: dropout must be in [0, 1), got {dropout}")
        self.items = items
        self.item_fc = (nn.Sequential(nn.Linear(in_dim, item_dim), nn.ReLU()) if item_dim is not None
                        else nn.Identity())
        width = item_dim if item_dim is not None else in_dim
        pairs = list(itertools.combinations(range(items), 2))
        self.register_buffer("pairs", torch.tensor(pairs, dtype=torch.int64), persistent=False)
        self.pair_fc = nn.Sequential(nn.Linear(2 * width, pair_dim), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.classifier = mlp([len(pairs) * pair_dim, num_classes], norm=None)

    def forward(self, feats: Tensor) -> Tensor:
        if feats.dim() != 3 or feats.shape[1] != self.items:
            raise ValueError(f"PairwiseOrderHead takes (B, {self.items}, D) item features, got {tuple(feats.shape)}")
        h = self.item_fc(feats)  # (B, K, d)
        pairs = torch.cat([h[:, self.pairs[:, 0]], h[:, self.pairs[:, 1]]], dim=2)  # (B, P, 2d)
        g = self.pair_fc(pairs).flatten(1)  # (B, P·pair_dim), pair p at block p
        return self.classifier(self.dropout(g))


# ------------------------------------------------------------------------------------------------- loss


def kept_cross_entropy(logits: Tensor, labels: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy (mean) over the samples with ``keep`` (B,) bool, and their accuracy; both 0 when none is kept
    (the loss then still depends on ``logits``, so the step has a graph and gives zero gradients)."""
    per_sample = F.cross_entropy(logits.float(), labels, reduction="none")
    w = keep.to(per_sample.dtype)
    n = w.sum().clamp_min(1.0)
    correct = (logits.detach().argmax(dim=1) == labels).to(per_sample.dtype)
    return (per_sample * w).sum() / n, (correct * w).sum() / n


def check_frames(who: str, have: int, need: int, hint: str) -> list[str]:
    """A clip method's frame budget problem as one line (empty when ``have`` ≥ ``need``)."""
    if have >= need:
        return []
    return [f"{who} needs clip views of at least {need} frames, the views have {have}: {hint}"]


def num_orders(n: int, *, reversal_invariant: bool = False) -> int:
    """Classes of an n-item order task: n!, or n!/2 where a sequence and its reverse are one class."""
    return math.factorial(n) // (2 if reversal_invariant else 1)
