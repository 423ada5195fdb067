"""Feature maps of every backbone kind: the pooled features equal the backbone's own forward, the maps have the
channels and strides their architecture says, gradients flow through them, and a backbone without a spatial map
gets a clear error."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_BACKBONES
from selfsup.nn.backbones import build_backbone
from selfsup.nn.feature_maps import NoFeatureMap, forward_maps, map_levels, max_levels

CASES = [
    # name, in_chans, size, params, expected (channels, stride) of the deepest levels
    ("small_resnet", 1, 32, {"widths": [8, 16, 32], "stem_stride": 2}, [(8, 2), (16, 4), (32, 8)]),
    ("resnet18", 3, 32, {}, [(64, 1), (128, 2), (256, 4), (512, 8)]),
    ("torchvision:resnet18", 3, 64, {"small_images": False}, [(64, 4), (128, 8), (256, 16), (512, 32)]),
    ("torchvision:mobilenet_v3_small", 3, 64, {}, [(16, 4), (24, 8), (48, 16), (576, 32)]),
    ("timm:resnet18", 3, 32, {}, [(64, 1), (128, 2), (256, 4), (512, 8)]),
    ("vit_tiny", 1, 32, {**TINY_BACKBONES["vit_tiny"], "patch_size": 8}, [(48, 8), (48, 8)]),
]


@pytest.mark.parametrize("name,chans,size,params,expected", CASES, ids=[c[0] for c in CASES])
def test_maps_and_pooled_features_of_every_kind(name, chans, size, params, expected):
    backbone = build_backbone(name, chans, size, **params).eval()
    x = torch.randn(2, chans, size, size)
    levels = len(expected)
    pooled, maps = forward_maps(backbone, x, levels)
    torch.testing.assert_close(pooled, backbone(x))  # one pass gives both, the pooled ones unchanged
    assert [(m.shape[1], size // m.shape[-1]) for m in maps] == expected
    assert [(lv.channels, lv.stride) for lv in map_levels(backbone, chans, size, levels)] == expected
    assert max_levels(backbone) >= levels
    assert all(m.shape[0] == 2 and m.shape[-1] == m.shape[-2] for m in maps)


def test_gradients_flow_through_the_hooked_maps_of_a_torchvision_cnn():
    backbone = build_backbone("torchvision:resnet18", 3, 32, small_images=True)
    _, maps = forward_maps(backbone, torch.randn(2, 3, 32, 32), 2)  # layer3's and layer4's outputs
    maps[0].square().mean().backward()  # only the shallower one: gradients reach what comes before it, nothing after
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.net.layer3.parameters())
    assert all(p.grad is None for p in backbone.net.layer4.parameters())


def test_a_backbone_without_spatial_maps_is_refused_naming_what_works():
    backbone = build_backbone("torchvision:vit_b_32", 3, 32)
    with pytest.raises(NoFeatureMap, match=r"torchvision:vit_b_32 gives no spatial feature map.*small_resnet.*timm"):
        map_levels(backbone, 3, 32)


def test_levels_beyond_the_depth_give_what_there_is():
    backbone = build_backbone("small_resnet", 1, 16, widths=[8, 16])
    _, maps = forward_maps(backbone, torch.randn(1, 1, 16, 16), 9)
    assert len(maps) == 2 and max_levels(backbone) == 2
    with pytest.raises(ValueError, match="levels must be ≥ 1"):
        forward_maps(backbone, torch.randn(1, 1, 16, 16), 0)
