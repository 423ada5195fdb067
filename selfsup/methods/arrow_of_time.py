"""Arrow of time: is this clip playing forwards or backwards?

Wei, Lim, Zisserman, Freeman. Learning and Using the Arrow of Time. CVPR 2018.

Half of every batch is reversed in time (which half: random per sample and step, :func:`reverse_some`), the video
backbone encodes each clip and a small MLP classifies forward (0) against backward (1), cross-entropy. The paper's
T-CAM classifies stacks of optical flow with a VGG-16; here the backbone sees the frames themselves (a 3D CNN,
``small_r3d`` by default), the setting of later arrow-of-time pretext work.

The paper's cautions about artificial cues, and what answers each here:

- black or padded frames at the start or end of a clip give its direction away: the clip views never pad (every
  view is frames of the record, :mod:`selfsup.views.clips`);
- a static clip has no arrow, so a label on it is noise: clips whose motion energy (the mean |x_{t+1} − x_t| over
  the clip, :func:`~selfsup.methods.temporal_order.motion_energy`, in normalised pixel units; the paper filters by
  flow) is below ``motion_threshold`` are dropped from the loss, and ``logs["kept"]`` says how many stayed;
- camera asymmetries (the paper's left-right/zoom cues) must not stand in for time: the views flip each clip
  horizontally with ``flip_p`` (0.5 in the recipe, the same flip on every frame), independently of the reversal.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.registry import register
from selfsup.methods.temporal_order import balanced_labels, kept_cross_entropy, motion_energy
from selfsup.nn.heads import mlp
from selfsup.views import Augment
from selfsup.views.clips import ClipRecipe


def reverse_some(x: Tensor, reverse: Tensor) -> Tensor:
    """Clips (B, C, T, H, W) with clip i played backwards where ``reverse[i]`` (B,) bool: frame t ← frame T−1−t."""
    return torch.where(reverse.view(-1, 1, 1, 1, 1).to(x.device), x.flip(2), x)


@register("arrow_of_time", "pretext", "Wei et al. 2018, Learning and Using the Arrow of Time, CVPR")
class ArrowOfTime(nn.Module):
    spec = MethodSpec(
        inputs="clips",
        views=ClipRecipe(clip_len=8, stride=2, clips=1,
                         augment=Augment(scale=(0.5, 1.0), flip_p=0.5, jitter_p=0.0, hue=0.0, saturation=0.0,
                                         gray_p=0.0, blur_p=0.0)),
        default_backbone="small_r3d",
        test_params={"head_hidden": 16},
        # no micro-batches: the loss is a mean over the clips the motion filter kept, which chunks would weigh unequally
        micro_batches=None,
    )

    def __init__(self, backbone: nn.Module, *, head_hidden: int = 256, motion_threshold: float = 0.01,
                 reversed_fraction: float = 0.5):
        super().__init__()
        if head_hidden < 1:
            raise ValueError(f"arrow_of_time: head_hidden must be ≥ 1, got {head_hidden}")
        if motion_threshold < 0:
            raise ValueError(f"arrow_of_time: motion_threshold must be ≥ 0 (0 keeps every clip), "
                             f"got {motion_threshold}")
        if not 0.0 < reversed_fraction < 1.0:
            raise ValueError(f"arrow_of_time: reversed_fraction must be in (0, 1), got {reversed_fraction}")
        self.backbone = backbone
        self.motion_threshold = motion_threshold
        self.reversed_fraction = reversed_fraction
        self.classifier = mlp([backbone.num_features, head_hidden, 2], norm="bn")

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        x = views[0]  # (B, C, T, H, W)
        if x.dim() != 5 or x.shape[2] < 2:
            raise ValueError(f"arrow_of_time needs clips (B, C, T ≥ 2, H, W), got shape {tuple(x.shape)}")
        labels = balanced_labels(x.shape[0], self.reversed_fraction, x.device)  # True: played backwards
        keep = motion_energy(x) >= self.motion_threshold  # reversal keeps the energy: measured on either
        feats = self.backbone(reverse_some(x, labels))
        loss, acc = kept_cross_entropy(self.classifier(feats), labels.long(), keep)
        return loss, {"pretext_acc": acc.detach(), "kept": keep.sum().float(), "z": feats.detach()}
