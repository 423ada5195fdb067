"""Order prediction network (OPN): sort a shuffled sequence of frames, a sequence and its reverse one answer.

Lee, Huang, Singh, Yang. Unsupervised Representation Learning by Sorting Sequences. ICCV 2017, arXiv:1708.01246.

Per sample, n = 4 frames ``frame_gap`` apart are taken from a high-motion window of the view (the paper picks
windows by optical-flow magnitude; here by the frame-difference energy,
:func:`~selfsup.methods.temporal_order.sample_motion_windows`), shuffled by one of the 4! permutations drawn
uniformly, and the network names the order among 4!/2 = 12 classes: forward and backward sequences are one class
(:func:`~selfsup.methods.temporal_order.reversal_classes`), since either is a plausible motion (§3.1). Each frame is
encoded on its own (:func:`~selfsup.methods.temporal_order.frame_embeddings`: an image backbone by default,
``per_frame``), then the paper's pairwise feature extraction (§3.2): a shared per-frame fc6, every pair of fc6
features concatenated through a shared fc7, all six pairs concatenated, fc8 over the 12 classes
(:class:`~selfsup.methods.temporal_order.PairwiseOrderHead`).

The paper's cues against shortcuts (§3.3), per frame and so optional: spatial jittering (``jitter``: each frame a
crop ``jitter`` px smaller than the view at its own random place) and channel splitting (``channel_split``: each
colour frame replaced by one random channel of it copied to all; nothing to do on grey data). Clips whose window
moves less than ``motion_threshold`` (mean |x_{t+1} − x_t|, normalised units) are dropped from the loss: a static
window has no order to find.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.registry import register
from selfsup.methods.temporal_order import (frame_window_views,
                                            PairwiseOrderHead, apply_order, check_frames, frame_embeddings,
                                            gather_frames, kept_cross_entropy, order_permutations, reversal_classes,
                                            sample_motion_windows)
from selfsup.views.clips import ClipRecipe


def jitter_frames(frames: Tensor, jitter: int) -> Tensor:
    """Frames (B, K, C, H, W) → (B, K, C, H − j, W − j): each frame cropped at its own random offset in [0, j]²."""
    if jitter <= 0:
        return frames
    b, k, _, h, w = frames.shape
    f = frames.flatten(0, 1)
    oy = torch.randint(0, jitter + 1, (b * k,), device=f.device)
    ox = torch.randint(0, jitter + 1, (b * k,), device=f.device)
    rows = oy[:, None] + torch.arange(h - jitter, device=f.device)  # (BK, h')
    cols = ox[:, None] + torch.arange(w - jitter, device=f.device)  # (BK, w')
    i = torch.arange(b * k, device=f.device)[:, None, None]
    out = f.permute(0, 2, 3, 1)[i, rows[:, :, None], cols[:, None, :]]  # (BK, h', w', C)
    return out.permute(0, 3, 1, 2).unflatten(0, (b, k))


def split_channels(frames: Tensor) -> Tensor:
    """Frames (B, K, C, H, W) with each frame's channels replaced by one of them drawn at random (the paper's
    channel splitting, against chromatic-aberration cues); grey frames (C = 1) unchanged."""
    c = frames.shape[2]
    if c == 1:
        return frames
    pick = torch.randint(0, c, frames.shape[:2], device=frames.device)  # (B, K)
    one = frames.gather(2, pick[:, :, None, None, None].expand(-1, -1, 1, *frames.shape[3:]))
    return one.expand_as(frames)


@register("opn", "pretext", "Lee et al. 2017, Unsupervised Representation Learning by Sorting Sequences, "
          "arXiv:1708.01246")
class OPN(nn.Module):
    spec = MethodSpec(
        inputs="clips",
        views=frame_window_views(),
        default_backbone="per_frame",
        test_params={"frame_gap": 1, "frame_dim": 16, "pair_dim": 16},
        # no micro-batches: the loss is a mean over the clips the motion filter kept, which chunks would weigh unequally
        micro_batches=None,
    )

    def __init__(self, backbone: nn.Module, *, frames: int = 4, frame_gap: int = 2, frame_dim: int = 256,
                 pair_dim: int = 256, dropout: float = 0.5, jitter: int = 0, channel_split: bool = False,
                 motion_threshold: float = 0.01):
        super().__init__()
        if not 3 <= frames <= 5:
            raise ValueError(f"opn: frames must be 3–5 (the paper uses 4: 12 classes), got {frames}")
        if frame_gap < 1 or jitter < 0 or motion_threshold < 0:
            raise ValueError(f"opn: frame_gap must be ≥ 1, jitter ≥ 0 and motion_threshold ≥ 0, got {frame_gap}, "
                             f"{jitter}, {motion_threshold}")
        self.backbone = backbone
        self.frames, self.frame_gap, self.jitter = frames, frame_gap, jitter
        self.channel_split, self.motion_threshold = channel_split, motion_threshold
        canonical, class_of = reversal_classes(frames)
        self.register_buffer("perms", order_permutations(frames), persistent=False)  # (n!, n)
        self.register_buffer("class_of", class_of, persistent=False)  # (n!,): p and reversed p share one
        self.head = PairwiseOrderHead(backbone.num_features, frames, len(canonical), pair_dim=pair_dim,
                                      item_dim=frame_dim, dropout=dropout)

    @property
    def span(self) -> int:
        """View frames the sampled frames cover: (n − 1)·frame_gap + 1."""
        return (self.frames - 1) * self.frame_gap + 1

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def check_run(self, n_train: int, batch_size: int, recipe: ClipRecipe) -> list[str]:
        return check_frames("opn", recipe.clip_len, self.span, "raise views.clip_len or lower method.params.frame_gap")

    def shuffled_frames(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Clips (B, C, L, H, W) → shuffled frames (B, n, C, H, W), their class (B,), the drawn permutation's index
        into ``perms`` (B,) and which clips move enough (B,) bool. ``shuffled[b, k]`` is the frame at temporal
        position ``perms[idx[b], k]`` of the window."""
        if x.dim() != 5 or x.shape[2] < self.span:
            raise ValueError(f"opn: {self.frames} frames {self.frame_gap} apart need clips "
                             f"(B, C, T ≥ {self.span}, H, W), got shape {tuple(x.shape)}")
        starts, motion = sample_motion_windows(x, self.span)
        positions = starts[:, None] + torch.arange(self.frames, device=x.device) * self.frame_gap  # (B, n)
        idx = torch.randint(len(self.perms), (x.shape[0],), device=x.device)  # every order equally likely
        shuffled = apply_order(gather_frames(x, positions), self.perms[idx])
        return shuffled, self.class_of[idx], idx, motion >= self.motion_threshold

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        frames, labels, _, keep = self.shuffled_frames(views[0])
        if self.channel_split:
            frames = split_channels(frames)
        frames = jitter_frames(frames, self.jitter)
        feats = frame_embeddings(self.backbone, frames)  # (B, n, D)
        loss, acc = kept_cross_entropy(self.head(feats), labels, keep)
        return loss, {"pretext_acc": acc.detach(), "kept": keep.sum().float(), "z": feats.mean(dim=1).detach()}
