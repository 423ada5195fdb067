"""Shuffle and Learn: is the middle frame of this triplet really between the other two?

Misra, Zitnick, Hebert. Shuffle and Learn: Unsupervised Learning using Temporal Order Verification. ECCV 2016,
arXiv:1603.08561.

Per sample, a high-motion window of ``window`` frames is drawn from the view (the paper ranks windows by
optical-flow magnitude; here by the frame-difference energy, the mean |x_{t+1} − x_t|,
:func:`~selfsup.methods.temporal_order.sample_motion_windows`), and five frames a < b < c < d < e are drawn in it
(:func:`five_frames`). A positive triplet is (b, c, d), the middle frame between the outer two; a negative replaces
it by a frame outside them, (b, a, d) or (b, e, d) (§3.1). Either is shown forwards or backwards at random: the
paper counts (d, c, b) as positive too, and reversing negatives alike keeps the direction from being a cue. Each
frame is encoded on its own (:func:`~selfsup.methods.temporal_order.frame_embeddings`; an image backbone by default,
``per_frame``), through a shared per-frame fc (the paper's fc7), the three concatenated in tuple order into a linear
binary classifier (fc8), cross-entropy.

Class ratio: ``positive_fraction`` = 0.25, the paper's 1:3 positives to negatives, exactly per batch (random
places). Clips whose window moves less than ``motion_threshold`` are dropped from the loss (a static window makes
positives and negatives the same pictures); ``logs["kept"]`` counts the rest.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.registry import register
from selfsup.methods.temporal_order import (frame_window_views,
                                            balanced_labels, check_frames, frame_embeddings, gather_frames,
                                            kept_cross_entropy, sample_motion_windows)
from selfsup.views.clips import ClipRecipe
from selfsup.nn.heads import mlp


def five_frames(starts: Tensor, window: int) -> Tensor:
    """Positions a < b < c < d < e, (B, 5) int64, uniformly among the 5-subsets of each window
    [start, start + window)."""
    if window < 5:
        raise ValueError(f"shuffle_and_learn: a window must hold 5 distinct frames, got {window}")
    offsets = torch.rand(starts.shape[0], window, device=starts.device).argsort(dim=1)[:, :5].sort(dim=1).values
    return starts[:, None] + offsets


def make_triplets(five: Tensor, positive: Tensor, backwards: Tensor, use_first: Tensor) -> Tensor:
    """Triplet frame positions (B, 3) from five ordered positions (B, 5) = (a, b, c, d, e): (b, c, d) where
    ``positive``, else (b, a, d) where ``use_first``, else (b, e, d); each read right to left where ``backwards``
    (all flags (B,) bool)."""
    a, b, c, d, e = five.unbind(dim=1)
    middle = torch.where(positive, c, torch.where(use_first, a, e))
    first, last = torch.where(backwards, d, b), torch.where(backwards, b, d)
    return torch.stack([first, middle, last], dim=1)


@register("shuffle_and_learn", "pretext", "Misra et al. 2016, Shuffle and Learn: Unsupervised Learning using "
          "Temporal Order Verification, arXiv:1603.08561")
class ShuffleAndLearn(nn.Module):
    spec = MethodSpec(
        inputs="clips",
        views=frame_window_views(),
        default_backbone="per_frame",
        test_params={"window": 6, "frame_dim": 16},
        # no micro-batches: the loss is a mean over the clips the motion filter kept, which chunks would weigh unequally
        micro_batches=None,
    )

    def __init__(self, backbone: nn.Module, *, window: int = 10, positive_fraction: float = 0.25,
                 frame_dim: int = 256, motion_threshold: float = 0.01):
        super().__init__()
        if window < 5:
            raise ValueError(f"shuffle_and_learn: window must be ≥ 5 frames (five distinct frames a–e), got {window}")
        if not 0.0 < positive_fraction < 1.0:
            raise ValueError(f"shuffle_and_learn: positive_fraction must be in (0, 1), got {positive_fraction}")
        if frame_dim < 1 or motion_threshold < 0:
            raise ValueError(f"shuffle_and_learn: frame_dim must be ≥ 1 and motion_threshold ≥ 0, got {frame_dim}, "
                             f"{motion_threshold}")
        self.backbone = backbone
        self.window, self.positive_fraction, self.motion_threshold = window, positive_fraction, motion_threshold
        self.frame_fc = nn.Sequential(nn.Linear(backbone.num_features, frame_dim), nn.ReLU())
        self.classifier = mlp([3 * frame_dim, 2], norm=None)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def check_run(self, n_train: int, batch_size: int, recipe: ClipRecipe) -> list[str]:
        return check_frames("shuffle_and_learn", recipe.clip_len, self.window,
                            "raise views.clip_len or lower method.params.window")

    def triplets(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Clips (B, C, L, H, W) → triplet frames (B, 3, C, H, W), labels (B,) int64 (1: in order) and which
        clips' windows move enough (B,) bool."""
        if x.dim() != 5 or x.shape[2] < self.window:
            raise ValueError(f"shuffle_and_learn: windows of {self.window} frames need clips (B, C, T ≥ {self.window}, "
                             f"H, W), got shape {tuple(x.shape)}")
        b = x.shape[0]
        starts, motion = sample_motion_windows(x, self.window)
        five = five_frames(starts, self.window)
        positive = balanced_labels(b, self.positive_fraction, x.device)
        backwards = torch.rand(b, device=x.device) < 0.5
        use_first = torch.rand(b, device=x.device) < 0.5
        positions = make_triplets(five, positive, backwards, use_first)
        return gather_frames(x, positions), positive.long(), motion >= self.motion_threshold

    def classify(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Triplet frames (B, 3, C, H, W) → logits (B, 2) and the frame features (B, 3, D)."""
        feats = frame_embeddings(self.backbone, frames)
        return self.classifier(self.frame_fc(feats).flatten(1)), feats

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        frames, labels, keep = self.triplets(views[0])
        logits, feats = self.classify(frames)
        loss, acc = kept_cross_entropy(logits, labels, keep)
        return loss, {"pretext_acc": acc.detach(), "kept": keep.sum().float(), "z": feats.mean(dim=1).detach()}
