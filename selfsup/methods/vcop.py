"""Video clip order prediction (VCOP): in which order were these clips of one video shuffled?

Xu, Xiao, Zhao, Shao, Xie, Zhuang. Self-supervised Spatiotemporal Learning via Video Clip Order Prediction. CVPR 2019.

From one long view, N clips of T frames with ``gap`` frames between them are cut in order (:func:`cut_clips`; a
random offset where the view is longer than they need), shuffled by one of the N! permutations drawn per sample, and
each encoded by the 3D backbone (all B·N clips in one call). The order head is the paper's: every pair of clip
features concatenated through one shared fc layer (512 in the paper) + ReLU, all pairs concatenated, dropout 0.5,
a linear classifier over the N! orders (:class:`~selfsup.methods.temporal_order.PairwiseOrderHead`), cross-entropy.
Paper: N = 3 clips of 16 frames, 8 frames apart, 112 px, R3D / R(2+1)D / C3D. The paper filters nothing for
motion; neither does this.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.registry import register
from selfsup.methods.temporal_order import (PairwiseOrderHead, apply_order, check_frames, kept_cross_entropy,
                                            order_permutations)
from selfsup.views import Augment
from selfsup.views.clips import ClipRecipe


def tuple_frames(num_clips: int, clip_frames: int, gap: int) -> int:
    """View frames N clips of T frames with ``gap`` frames between neighbours span: N·T + (N − 1)·gap."""
    return num_clips * clip_frames + (num_clips - 1) * gap


def cut_clips(x: Tensor, num_clips: int, clip_frames: int, gap: int, offset: Tensor | None = None) -> Tensor:
    """A long view (B, C, L, H, W) → N clips in temporal order (B, N, C, T, H, W): clip n is frames
    offset + n·(T + gap) … + T − 1. ``offset`` (B,) int64 (default 0) must keep the tuple inside the view."""
    b, length = x.shape[0], x.shape[2]
    need = tuple_frames(num_clips, clip_frames, gap)
    if length < need:
        raise ValueError(f"vcop: {num_clips} clips of {clip_frames} frames {gap} apart need views of {need} frames, "
                         f"got {length}")
    if offset is None:
        offset = torch.zeros(b, dtype=torch.int64, device=x.device)
    starts = offset[:, None] + torch.arange(num_clips, device=x.device) * (clip_frames + gap)  # (B, N)
    t = starts[:, :, None] + torch.arange(clip_frames, device=x.device)  # (B, N, T)
    frames = x.transpose(1, 2)[torch.arange(b, device=x.device)[:, None], t.flatten(1)]  # (B, N·T, C, H, W)
    return frames.unflatten(1, (num_clips, clip_frames)).transpose(2, 3)  # (B, N, C, T, H, W)


@register("vcop", "pretext", "Xu et al. 2019, Self-supervised Spatiotemporal Learning via Video Clip Order "
          "Prediction, CVPR")
class VCOP(nn.Module):
    spec = MethodSpec(
        inputs="clips",
        # 3 clips of 4 frames, 2 apart: 16 frames, all of a Moving Fashion-MNIST record at stride 1
        views=ClipRecipe(clip_len=16, stride=1, clips=1,
                         augment=Augment(scale=(0.5, 1.0), flip_p=0.5, jitter_p=0.0, hue=0.0, saturation=0.0,
                                         gray_p=0.0, blur_p=0.0)),
        default_backbone="small_r3d",
        # dropout 0 in the registry tests: its masks are not drawn sample by sample, so micro-batches would draw
        # other (equally distributed) masks than the whole batch and the exact-parity test could not compare them
        test_params={"clip_frames": 2, "gap": 1, "pair_dim": 16, "dropout": 0.0},
        micro_batches="per_sample",  # a mean of per-sample terms
    )

    def __init__(self, backbone: nn.Module, *, num_clips: int = 3, clip_frames: int = 4, gap: int = 2,
                 pair_dim: int = 512, dropout: float = 0.5):
        super().__init__()
        if not 2 <= num_clips <= 5:
            raise ValueError(f"vcop: num_clips must be 2–5 (the paper compares 2–5; 5! = 120 orders), got {num_clips}")
        if clip_frames < 1 or gap < 0:
            raise ValueError(f"vcop: clip_frames must be ≥ 1 and gap ≥ 0, got {clip_frames}, {gap}")
        self.backbone = backbone
        self.num_clips, self.clip_frames, self.gap = num_clips, clip_frames, gap
        self.register_buffer("perms", order_permutations(num_clips), persistent=False)  # (N!, N), row k: class k
        self.head = PairwiseOrderHead(backbone.num_features, num_clips, len(self.perms), pair_dim=pair_dim,
                                      dropout=dropout)

    @property
    def frames_needed(self) -> int:
        return tuple_frames(self.num_clips, self.clip_frames, self.gap)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def check_run(self, n_train: int, batch_size: int, recipe: ClipRecipe) -> list[str]:
        return check_frames("vcop", recipe.clip_len, self.frames_needed,
                            "raise views.clip_len, or lower method.params.clip_frames / gap / num_clips")

    def shuffled_tuples(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """A long view (B, C, L, H, W) → shuffled clip tuples (B, N, C, T, H, W) and their order class (B,):
        ``shuffled[b, k]`` is the clip at temporal position ``perms[label[b], k]``."""
        b, orders = x.shape[0], len(self.perms)
        offsets = max(1, x.shape[2] - self.frames_needed + 1)  # too short: cut_clips says so
        # one draw per sample picks its offset and its order together, so a batch cut into micro-batches draws what
        # the whole batch does, sample by sample
        r = torch.randint(orders * offsets, (b,), device=x.device)
        labels = r % orders
        clips = cut_clips(x, self.num_clips, self.clip_frames, self.gap, r // orders)
        return apply_order(clips, self.perms[labels]), labels

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        shuffled, labels = self.shuffled_tuples(views[0])
        b, n = shuffled.shape[:2]
        feats = self.backbone(shuffled.flatten(0, 1)).unflatten(0, (b, n))  # (B, N, D): every clip in one call
        keep = torch.ones(b, dtype=torch.bool, device=feats.device)
        loss, acc = kept_cross_entropy(self.head(feats), labels, keep)
        return loss, {"pretext_acc": acc.detach(), "z": feats.mean(dim=1).detach()}
