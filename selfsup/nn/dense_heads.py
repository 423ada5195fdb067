"""Heads that turn an encoder's feature maps into dense predictions, for the segmentation and detection protocols.

- :class:`LinearSegHead`: DINOv2's linear segmentation protocol (Oquab et al. 2023, arXiv:2304.07193 §7.4; the
  reference ``dinov2/eval/segmentation/models/decode_heads/linear_head.py``): the maps of one level, or of the last
  four concatenated, BatchNorm, a 1×1 convolution to class logits, bilinearly upsampled to the mask.
- :class:`SemanticFPNHead`: a light decoder for fine-tuning: torchvision's ``FeaturePyramidNetwork`` over the
  encoder's levels, then Panoptic FPN's semantic branch (Kirillov et al. 2019, arXiv:1901.02446 §3): every
  pyramid level through a 3×3 conv + GroupNorm + ReLU, upsampled to the finest level, summed, and a 1×1 classifier.
- :func:`build_fcos`: torchvision's FCOS detector (Tian et al. 2019, arXiv:1904.01355) over the encoder's last
  levels through an FPN (:class:`DetectionBackbone`); for a ViT, whose blocks share one stride, ViTDet's simple
  feature pyramid (Li et al. 2022, arXiv:2203.16527) makes three scales of its last map first.

Encoders are frozen (``freeze=True``: no gradient, BatchNorm statistics fixed, always in eval mode) for the
frozen protocols and trained for fine-tuning.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.nn.feature_maps import MapLevel, forward_maps, map_levels


class MapEncoder(nn.Module):
    """An encoder as a source of its ``levels`` deepest maps; ``freeze`` keeps it fixed and in eval mode."""

    def __init__(self, encoder: nn.Module, levels: int, freeze: bool):
        super().__init__()
        self.encoder = encoder
        self.levels = levels
        self.frozen = freeze
        if freeze:
            encoder.requires_grad_(False)
            encoder.eval()

    def train(self, mode: bool = True) -> "MapEncoder":
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        if self.frozen:
            with torch.no_grad():
                return forward_maps(self.encoder, x, self.levels)[1]
        return forward_maps(self.encoder, x, self.levels)[1]


class LinearSegHead(nn.Module):
    """BatchNorm + 1×1 conv over the concatenated maps (each resized to the first, finest one), upsampled."""

    def __init__(self, channels: Sequence[int], num_classes: int):
        super().__init__()
        width = sum(channels)
        self.bn = nn.BatchNorm2d(width)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, maps: Sequence[Tensor], size: int) -> Tensor:
        """[(B, C_i, h_i, w_i)] → (B, num_classes, size, size) logits."""
        grid = max(m.shape[-1] for m in maps)
        maps = [m if m.shape[-1] == grid else F.interpolate(m, size=(grid, grid), mode="bilinear", align_corners=False)
                for m in maps]
        logits = self.classifier(self.bn(torch.cat(maps, dim=1).float()))
        return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def _conv_gn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(32, cout // 4) or 1, cout),
                         nn.ReLU(inplace=True))


class SemanticFPNHead(nn.Module):
    """FPN (torchvision) + Panoptic FPN's semantic branch, light: ``width`` channels in the pyramid and the branch."""

    def __init__(self, channels: Sequence[int], num_classes: int, width: int = 64):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        self.fpn = FeaturePyramidNetwork(list(channels), width)
        self.branches = nn.ModuleList(_conv_gn_relu(width, width) for _ in channels)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, maps: Sequence[Tensor], size: int) -> Tensor:
        pyramid = self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))
        grid = max(p.shape[-1] for p in pyramid.values())
        total = None
        for branch, p in zip(self.branches, pyramid.values()):
            y = branch(p)
            if y.shape[-1] != grid:
                y = F.interpolate(y, size=(grid, grid), mode="bilinear", align_corners=False)
            total = y if total is None else total + y
        return F.interpolate(self.classifier(total), size=(size, size), mode="bilinear", align_corners=False)


class Segmenter(nn.Module):
    """Maps of an encoder → a segmentation head → (B, num_classes, size, size) logits."""

    def __init__(self, maps: MapEncoder, head: nn.Module):
        super().__init__()
        self.maps = maps
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.maps(x), x.shape[-1])


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid from one stride-s map: a 2×2 transposed conv (s/2), the map (s), a 2×2 max
    pool (2s)."""

    def __init__(self, channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(channels, channels, 2, stride=2)

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        last = maps[-1]
        return [self.up(last), last, F.max_pool2d(last, 2)]


class DetectionBackbone(nn.Module):
    """What torchvision's detectors take as a backbone: ``forward(x)`` → OrderedDict of FPN maps, ``out_channels``."""

    def __init__(self, maps: MapEncoder, levels: list[MapLevel], width: int):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        self.maps = maps
        self.pyramid = SimplePyramid(levels[-1].channels) if len(levels) == 1 else None
        channels = [levels[-1].channels] * 3 if self.pyramid is not None else [lv.channels for lv in levels]
        self.fpn = FeaturePyramidNetwork(channels, width)
        self.out_channels = width

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        maps = self.maps(x)
        if self.pyramid is not None:
            maps = self.pyramid(maps)
        return self.fpn(OrderedDict((str(i), m.float()) for i, m in enumerate(maps)))


def detection_strides(levels: list[MapLevel]) -> list[int]:
    """The strides of the pyramid :class:`DetectionBackbone` builds over ``levels``."""
    if len(levels) == 1:
        s = levels[-1].stride
        return [max(1, s // 2), s, 2 * s]
    return [lv.stride for lv in levels]


def build_fcos(encoder: nn.Module, in_chans: int, image_size: int, num_classes: int, mean: Sequence[float],
               std: Sequence[float], *, freeze: bool, levels: int = 3, width: int = 64, head_convs: int = 2,
               score_thresh: float = 0.05, detections: int = 100) -> nn.Module:
    """torchvision's FCOS over ``encoder``'s ``levels`` deepest maps (a ViT: its last block's, as a simple pyramid).

    ``num_classes`` counts the background (torchvision's convention: labels 1 … num_classes − 1). Images are
    given at their size in [0, 1]; FCOS's transform normalises them with ``mean``/``std`` and resizes nothing
    (``min_size = max_size = image_size``). One anchor point per cell, its size the level's stride, so FCOS's
    scale ranges ([4s, 8s] of the largest box-side distance; the first level from 0, the last to ∞) follow the
    strides. CPU-sized by default: a 64-wide FPN and two convolutions per head tower instead of 256 and four
    (the paper's); ``score_thresh`` 0.05 and 100 detections per image, COCO scoring's usual setting.
    """
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead

    found = map_levels(encoder, in_chans, image_size, levels)
    if len({lv.stride for lv in found}) == 1:  # a ViT's blocks: one map, made into three scales
        found, levels = found[-1:], 1
    backbone = DetectionBackbone(MapEncoder(encoder, levels, freeze), found, width)
    strides = detection_strides(found)
    anchors = AnchorGenerator(sizes=tuple((s,) for s in strides), aspect_ratios=((1.0,),) * len(strides))
    head = FCOSHead(width, 1, num_classes, num_convs=head_convs)
    return FCOS(backbone, num_classes, min_size=image_size, max_size=image_size, image_mean=list(mean),
                image_std=list(std), anchor_generator=anchors, head=head, score_thresh=score_thresh,
                detections_per_img=detections)
