"""Backbone contract: (B, C, H, W) → (B, num_features), and the small CNN's stem options."""
from __future__ import annotations

import pytest
import torch

from selfsup.nn.backbones import BACKBONES, build_backbone


@pytest.mark.parametrize("stem_stride", [1, 2])
def test_small_resnet_reports_its_feature_width(stem_stride):
    net = build_backbone("small_resnet", 1, 28, widths=[8, 16, 32], stem_stride=stem_stride)
    assert net.num_features == 32
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 32)


def test_stem_stride_two_halves_the_stem_resolution():
    full = build_backbone("small_resnet", 1, 28, widths=[8, 16], stem_stride=1)
    half = build_backbone("small_resnet", 1, 28, widths=[8, 16], stem_stride=2)
    x = torch.randn(2, 1, 28, 28)
    assert full.stem(x).shape[-2:] == (28, 28)
    assert half.stem(x).shape[-2:] == (14, 14)
    assert half.stages(half.stem(x)).shape[-2:] == (7, 7)
    # same parameters, only the stride differs
    assert sum(p.numel() for p in full.parameters()) == sum(p.numel() for p in half.parameters())


@pytest.mark.parametrize("kwargs, message", [({"stem_stride": 3}, "stem_stride must be 1 or 2"),
                                             ({"widths": []}, "widths must be a non-empty list")])
def test_small_resnet_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_backbone("small_resnet", 1, 28, **kwargs)


def test_registry_names_the_documented_backbones():
    assert {"small_resnet", "resnet18", "resnet50"} <= set(BACKBONES)
