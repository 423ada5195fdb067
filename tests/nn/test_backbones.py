"""Backbone contract: (B, C, H, W) → (B, num_features), and the small CNN's stem options."""
from __future__ import annotations

import pytest
import torch

from selfsup.nn.backbones import BACKBONES, BackboneError, build_backbone, check_backbone_name


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


@pytest.mark.parametrize("blocks", [1, 2])
def test_pooled_stages_concatenate_the_last_stages_pools(blocks):
    torch.manual_seed(0)
    one = build_backbone("small_resnet", 1, 28, widths=[8, 16, 32], blocks=blocks, stem_stride=2)
    two = build_backbone("small_resnet", 1, 28, widths=[8, 16, 32], blocks=blocks, stem_stride=2, pooled_stages=2)
    three = build_backbone("small_resnet", 1, 28, widths=[8, 16, 32], blocks=blocks, stem_stride=2, pooled_stages=3)
    two.load_state_dict(one.state_dict())  # same weights and keys: only the embedding differs
    three.load_state_dict(one.state_dict())
    x = torch.randn(3, 1, 28, 28)
    assert (two.num_features, three.num_features) == (48, 56)
    stem = one.stem(x)
    middle = one.stages[:blocks](stem)  # the end of the 16-wide stage
    expected = torch.cat([middle.mean(dim=(2, 3)), one(x)], dim=1)
    torch.testing.assert_close(two(x), expected)
    torch.testing.assert_close(three(x), torch.cat([stem.mean(dim=(2, 3)), expected], dim=1))


def test_pool_grid_keeps_each_cell_of_the_last_map():
    torch.manual_seed(0)
    pooled = build_backbone("small_resnet", 1, 28, widths=[8, 16, 32], stem_stride=2)
    grid = build_backbone("small_resnet", 1, 28, widths=[8, 16, 32], stem_stride=2, pool_grid=2)
    grid.load_state_dict(pooled.state_dict())  # same weights and keys: only the embedding differs
    x = torch.randn(3, 1, 28, 28)
    last = pooled.stages(pooled.stem(x))
    assert last.shape[-2:] == (4, 4) and grid.num_features == 32 * 4
    cells = last.unflatten(2, (2, 2)).unflatten(4, (2, 2)).mean(dim=(3, 5))  # (B, C, 2, 2): 2×2 blocks averaged
    torch.testing.assert_close(grid(x), cells.flatten(1))  # channel-major, as a flattened map
    # the grid's cells average to the global pool
    torch.testing.assert_close(grid(x).unflatten(1, (32, 4)).mean(2), pooled(x))
    both = build_backbone("small_resnet", 1, 28, widths=[8, 16, 32], stem_stride=2, pool_grid=2, pooled_stages=2)
    assert both.num_features == (16 + 32) * 4 and both(x).shape == (3, 192)


@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_grid_the_size_of_the_map_is_the_map_flattened(channels_last):
    torch.manual_seed(0)  # the default recipe's case: a 2×2 last map at 28 px, taken without pooling
    net = build_backbone("small_resnet", 1, 28, widths=[8, 16, 32, 64], stem_stride=2, pool_grid=2)
    x = torch.randn(3, 1, 28, 28)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    last = net.stages(net.stem(x))
    assert last.shape[-2:] == (2, 2)
    torch.testing.assert_close(net(x), torch.nn.functional.adaptive_avg_pool2d(last, 2).flatten(1))


@pytest.mark.parametrize("kwargs, message", [({"stem_stride": 3}, "stem_stride must be 1 or 2"),
                                             ({"widths": []}, "widths must be a non-empty list"),
                                             ({"widths": [8, 16], "pooled_stages": 3}, "pooled_stages must be 1–2"),
                                             ({"pool_grid": 0}, "pool_grid must be an integer 1–8"),
                                             ({"pool_grid": 1.5}, "pool_grid must be an integer 1–8")])
def test_small_resnet_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_backbone("small_resnet", 1, 28, **kwargs)


def test_registry_names_the_documented_backbones():
    assert {"small_resnet", "resnet18", "resnet50"} <= set(BACKBONES)


# ------------------------------------------------------------------ torchvision:NAME and timm:NAME adapters


pytestmark = pytest.mark.usefixtures("one_thread")

# (name, params, in_chans, image size): CNNs and ViTs of both libraries, small and cheap to build; each
# stresses something: a 1-channel first conv, a pre-logits head layer kept (MobileNetV3), timm's
# head_hidden_size ≠ num_features, the small-image stem on a timm ResNet, img_size for a timm ViT.
LIBRARY_CASES = [
    ("torchvision:resnet18", {}, 3, 16),
    ("torchvision:regnet_y_400mf", {}, 1, 32),
    ("torchvision:mobilenet_v3_small", {}, 1, 32),
    ("timm:resnet18", {}, 1, 16),
    ("timm:mobilenetv3_small_050", {}, 1, 32),
    ("timm:convnext_atto", {"drop_path_rate": 0.1}, 3, 32),
    ("timm:vit_tiny_patch16_224", {"depth": 2}, 3, 32),
]


@pytest.mark.parametrize("name, params, in_chans, size", LIBRARY_CASES, ids=[c[0] for c in LIBRARY_CASES])
def test_library_backbone_contract(name, params, in_chans, size):
    """(B, num_features) out; every parameter reached by the gradient; channels-last + bf16 autocast, as the
    training loop runs them, forward and backward."""
    net = build_backbone(name, in_chans, size, **params)
    assert isinstance(net.num_features, int)
    x = torch.randn(2, in_chans, size, size)
    assert net(x).shape == (2, net.num_features)

    net = net.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, net.num_features) and torch.isfinite(out.float()).all()
    (out.float() * torch.randn(out.shape)).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reaches {missing}"


def test_params_pass_through_to_the_library_constructor():
    timm_net = build_backbone("timm:vit_tiny_patch16_224", 3, 32, depth=2, drop_path_rate=0.1)
    assert len(timm_net.net.blocks) == 2 and timm_net.net.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    tv_net = build_backbone("torchvision:efficientnet_b0", 3, 32, stochastic_depth_prob=0.3)
    assert tv_net.kwargs == {"stochastic_depth_prob": 0.3}
    with pytest.raises(BackboneError, match=r"timm:resnet18 does not take these backbone.params \(no_such_arg\)"):
        build_backbone("timm:resnet18", 3, 32, no_such_arg=1)
    for name, reserved in (("torchvision:resnet18", "weights"), ("timm:resnet18", "pretrained"), ("timm:resnet18", "in_chans")):
        with pytest.raises(BackboneError, match=f"may not set {reserved}: selfsup builds the model without weights"):
            build_backbone(name, 3, 32, **{reserved: True})


def test_vit_position_embeddings_fit_the_image_size():
    timm_vit = build_backbone("timm:vit_tiny_patch16_224", 1, 48, depth=1)
    assert timm_vit.kwargs["img_size"] == 48 and timm_vit.net.pos_embed.shape[1] == 1 + 3 * 3
    assert timm_vit.net.patch_embed.proj.in_channels == 1
    # dynamic_img_size: multi-crop's smaller views run at any multiple of the patch size
    assert timm_vit.kwargs["dynamic_img_size"] and timm_vit.input_problem(16) is None
    assert timm_vit(torch.randn(2, 1, 16, 16)).shape == (2, 192)
    assert "24px views are not a multiple of its patch size 16" in timm_vit.input_problem(24)
    with pytest.raises(BackboneError, match="image size 28 is not divisible by its patch size 16"):
        build_backbone("timm:vit_tiny_patch16_224", 3, 28, depth=1)
    # checked from the name, before torchvision builds its 86 M parameters
    with pytest.raises(BackboneError, match="image size 28 is not divisible by its patch size 16"):
        build_backbone("torchvision:vit_b_16", 3, 28)


def test_one_channel_input_replaces_the_first_conv():
    net = build_backbone("torchvision:regnet_y_400mf", 1, 64)
    assert net.net.stem[0].in_channels == 1 and net.net.stem[0].stride == (2, 2)
    assert net.replaced[0] == ("stem.0", "torch.nn.Conv2d(1, 32, 3, 2, 1, bias=False)")


def test_small_image_stem_for_resnets_of_both_libraries():
    # on by default at ≤ 64 px, off above, either way when set
    for name, size, small_images, small in (("torchvision:resnet18", 32, None, True), ("timm:resnet18", 32, None, True),
                                            ("timm:resnet18", 96, None, False), ("torchvision:resnet18", 32, False, False)):
        net = build_backbone(name, 3, size, small_images=small_images).net
        assert (net.conv1.kernel_size, net.conv1.stride) == (((3, 3), (1, 1)) if small else ((7, 7), (2, 2)))
        assert isinstance(net.maxpool, torch.nn.Identity) == small
    with pytest.raises(BackboneError, match="small_images applies to ResNets"):
        build_backbone("timm:convnext_atto", 3, 32, small_images=True)


def test_registered_resnet18_is_torchvision_resnet18():
    """The same network, keys and initial weights as ``torchvision:resnet18`` and as the torchvision ResNet with
    a small-image stem that ``resnet18`` built before the adapters existed (so old runs and seeds still fit)."""
    import torchvision

    torch.manual_seed(0)
    ours = build_backbone("resnet18", 1, 28).state_dict()
    torch.manual_seed(0)
    theirs = build_backbone("torchvision:resnet18", 1, 28).state_dict()
    torch.manual_seed(0)
    before = torchvision.models.resnet18(weights=None)
    before.conv1 = torch.nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    before.maxpool, before.fc = torch.nn.Identity(), torch.nn.Identity()
    before = {f"net.{k}": v for k, v in before.state_dict().items()}
    for other in (theirs, before):
        assert ours.keys() == other.keys() and all(torch.equal(ours[k], other[k]) for k in ours)


def test_the_build_time_dry_run_changes_no_state():
    torch.manual_seed(0)
    net = build_backbone("torchvision:resnet18", 3, 32)
    after = torch.rand(1)
    torch.manual_seed(0)
    import torchvision

    torchvision.models.resnet18(weights=None)
    torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    assert torch.equal(after, torch.rand(1))  # the dry run drew no random numbers
    assert net.training and all(int(m.num_batches_tracked) == 0 for m in net.modules()
                                if isinstance(m, torch.nn.BatchNorm2d))


def test_unknown_names_list_close_names():
    with pytest.raises(BackboneError, match=r"timm has no model 'vit_smal_patch16_224'; close names: timm:vit_small_patch16_224"):
        check_backbone_name("timm:vit_smal_patch16_224")
    with pytest.raises(BackboneError, match="torchvision has no model 'resnet5'; close names: torchvision:resnet50"):
        build_backbone("torchvision:resnet5", 3, 32)
    with pytest.raises(BackboneError, match=r"unknown backbone 'resnet34' \(did you mean .*torchvision:resnet34, timm:resnet34"):
        check_backbone_name("resnet34")
    with pytest.raises(BackboneError, match="unknown backbone library 'tv'"):
        check_backbone_name("tv:resnet50")
    with pytest.raises(BackboneError, match="names pretrained weights .* use timm:resnet50"):
        check_backbone_name("timm:resnet50.a1_in1k")
    with pytest.raises(BackboneError, match="classifier is not a Linear"):
        build_backbone("torchvision:squeezenet1_1", 3, 64)


def test_check_names_accepts_library_names_and_explains_unknown_ones():
    from selfsup.config import ConfigError, config_from_dict
    from selfsup.train.build import check_names

    check_names(config_from_dict({"backbone": "timm:resnet18"}))
    check_names(config_from_dict({"backbone": "torchvision:resnet50"}))
    with pytest.raises(ConfigError, match="close names: torchvision:resnet50"):
        check_names(config_from_dict({"backbone": "torchvision:resnet500"}))


def test_an_image_too_small_for_the_network_names_the_smallest_that_works():
    with pytest.raises(BackboneError, match=r"16×16 images are too small .* needs at least (\d+)×\1") as info:
        build_backbone("torchvision:densenet121", 3, 16)
    smallest = int(info.value.args[0].split("needs at least ")[1].split("×")[0])
    net = build_backbone("torchvision:densenet121", 3, smallest)
    assert "cannot take 16×16 views" in net.input_problem(16)  # as multi-crop's local views are checked


def test_views_the_backbone_cannot_take_are_a_config_error():
    from selfsup.config import ConfigError, config_from_dict
    from selfsup.methods import get_method
    from selfsup.train.build import build_method, check_run, view_recipe

    cfg = config_from_dict({"method": "dino", "backbone": {"name": "timm:vit_tiny_patch16_224", "params": {"depth": 1}},
                            "views": {"local_size": 24}})
    model = build_method(cfg, 1, 32)
    with pytest.raises(ConfigError, match="24px views are not a multiple of its patch size 16"):
        check_run(model, cfg, 1000, view_recipe(cfg, get_method("dino").spec, 32))
    cfg.views["local_size"] = 16
    check_run(model, cfg, 1000, view_recipe(cfg, get_method("dino").spec, 32))


def test_masked_methods_name_the_vits_that_work():
    from selfsup.nn.vit import require_vit

    with pytest.raises(ValueError, match=r"mae: masked methods need selfsup's own ViT backbone \(vit_tiny, vit_small\).*"
                                         r"timm:vit_tiny_patch16_224 does not"):
        require_vit(build_backbone("timm:vit_tiny_patch16_224", 1, 32, depth=1), "mae")


def test_library_backbones_never_touch_the_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a backbone build tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    build_backbone("timm:vit_tiny_patch16_224", 3, 32, depth=1)
    build_backbone("torchvision:mobilenet_v3_small", 3, 32)


@pytest.mark.parametrize("pool_grid", [1, 2])
def test_pooling_sends_the_gradient_back_in_the_maps_memory_format(pool_grid):
    # a contiguous gradient into a channels-last map sends ReLU's and BatchNorm's backward down slow kernels
    torch.manual_seed(0)
    net = build_backbone("small_resnet", 1, 28, widths=[8, 16, 32, 64], stem_stride=2, pool_grid=pool_grid)
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(3, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    seen = []
    net.stages[-1].register_forward_hook(lambda m, i, out: None if out.register_hook(seen.append) else None)
    out = net(x)
    last = net.stages(net.stem(x))
    expected = last.mean(dim=(2, 3)) if pool_grid == 1 else last.flatten(1)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
