"""Video backbone contract: (B, C, T, H, W) clips → (B, num_features), ``input_kind == "clips"``; torchvision's
video models by name, the small 3D CNNs and the per-frame encoder."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from selfsup.nn.backbones import BACKBONES, BackboneError, build_backbone, check_backbone_name

pytestmark = pytest.mark.usefixtures("one_thread")

# (name, params, in_chans, frames, size): small and cheap; each torchvision family once (S3D needs ≥ 5 frames
# and ≥ 17 px), both channel counts, several clip lengths
CASES = [
    ("small_r3d", {"widths": [8, 16, 32]}, 1, 4, 32),
    ("small_r3d", {"widths": [8, 16, 32], "blocks": 2, "stem_stride": 1}, 3, 7, 32),
    ("small_r2plus1d", {"widths": [8, 16, 32]}, 1, 8, 32),
    ("small_r2plus1d", {"widths": [8, 16], "temporal_strides": [2]}, 3, 5, 32),
    ("per_frame", {"frame_params": {"widths": [8, 16]}}, 1, 4, 32),
    ("torchvision:r3d_18", {}, 1, 4, 32),
    ("torchvision:mc3_18", {}, 3, 4, 32),
    ("torchvision:r2plus1d_18", {}, 1, 6, 32),
    ("torchvision:s3d", {}, 3, 8, 32),
    ("torchvision:swin3d_t", {}, 1, 4, 32),
]


def _ids(cases):
    return [f"{c[0]}-C{c[2]}-T{c[3]}" for c in cases]


@pytest.mark.parametrize("name, params, in_chans, frames, size", CASES, ids=_ids(CASES))
def test_video_backbone_contract(name, params, in_chans, frames, size):
    """(B, num_features) out at two clip lengths; the attributes code reads; every parameter reached by the gradient."""
    net = build_backbone(name, in_chans, size, **params)
    assert net.input_kind == "clips"
    assert (net.in_chans, net.image_size) == (in_chans, size)
    assert all(isinstance(v, int) for v in (net.num_features, net.in_chans, net.image_size, net.min_frames))
    assert net.training
    with torch.no_grad():
        assert net(torch.randn(2, in_chans, max(net.min_frames, 1), size, size)).shape == (2, net.num_features)
    out = net(torch.randn(2, in_chans, frames, size, size))
    assert out.shape == (2, net.num_features) and torch.isfinite(out).all()
    (out * torch.randn(out.shape)).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient reaches {missing}"


def test_image_backbones_have_no_input_kind():
    assert getattr(build_backbone("small_resnet", 1, 28, widths=[8, 16]), "input_kind", "images") == "images"


@pytest.mark.parametrize("arch", ["r3d_18", "r2plus1d_18", "s3d", "swin3d_t"])
def test_other_channel_counts_replace_the_first_conv3d_with_one_of_its_shape(arch):
    import torchvision

    stock = next(m for m in torchvision.models.get_model(arch, weights=None).modules() if isinstance(m, nn.Conv3d))
    net = build_backbone(f"torchvision:{arch}", 1, 32)
    path, first = next((p, m) for p, m in net.net.named_modules() if isinstance(m, nn.Conv3d))
    assert first.in_channels == 1 and net.replaced[0][0] == path
    same = ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
    assert [getattr(first, a) for a in same] == [getattr(stock, a) for a in same]
    assert (first.bias is None) == (stock.bias is None)
    assert eval(net.replaced[0][1], {"torch": torch}).weight.shape == first.weight.shape  # the recorded recipe


def test_the_head_is_removed_and_num_features_is_its_input_width():
    assert build_backbone("torchvision:r3d_18", 3, 32).num_features == 512
    s3d = build_backbone("torchvision:s3d", 3, 32)  # its classifier is a 1×1×1 conv
    assert s3d.num_features == 1024 and isinstance(s3d.net.classifier, nn.Identity)
    assert not any(isinstance(m, nn.Linear) for m in build_backbone("torchvision:mc3_18", 3, 32).modules())


def test_too_small_frames_name_the_size_that_works():
    with pytest.raises(BackboneError, match=r"16×16 frames are too small .* needs at least (\d+)×\1 frames") as info:
        build_backbone("torchvision:s3d", 3, 16)
    smallest = int(info.value.args[0].split("needs at least ")[1].split("×")[0])
    net = build_backbone("torchvision:s3d", 3, smallest)
    assert net.min_frames > 1
    assert "cannot take 16×16 frames" in net.input_problem(16)
    assert net.input_problem(smallest) is None
    with pytest.raises(ValueError, match=f"needs clips of at least {net.min_frames} frames, got 2"):
        net(torch.zeros(1, 3, 2, smallest, smallest))


def test_fixed_size_models_are_refused_at_other_sizes_before_they_are_built():
    with pytest.raises(BackboneError, match=r"mvit_v2_s takes 16-frame 224×224 clips only .* not 32×32"):
        build_backbone("torchvision:mvit_v2_s", 3, 32)


def test_images_and_wrong_channels_get_a_clear_error():
    net = build_backbone("small_r3d", 1, 32, widths=[8, 16])
    with pytest.raises(ValueError, match=r"takes clips \(B, C, T, H, W\), got a 4-d tensor .* x.unsqueeze\(2\)"):
        net(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="built for 1-channel clips, got 3 channels"):
        net(torch.zeros(2, 3, 4, 32, 32))
    tv = build_backbone("torchvision:r3d_18", 1, 32)
    with pytest.raises(ValueError, match="torchvision:r3d_18 takes clips"):
        tv(torch.zeros(2, 1, 32, 32))


def test_the_build_time_dry_run_changes_no_state():
    import torchvision

    torch.manual_seed(0)
    net = build_backbone("torchvision:s3d", 3, 32)  # several dry runs: the search for its fewest frames
    after = torch.rand(1)
    torch.manual_seed(0)
    torchvision.models.get_model("s3d", weights=None)
    assert torch.equal(after, torch.rand(1))  # the dry runs drew no random numbers
    assert net.training and all(int(m.num_batches_tracked) == 0 for m in net.modules()
                                if isinstance(m, nn.BatchNorm3d))


def test_check_backbone_name_accepts_video_names_and_rejects_nonsense():
    import torchvision

    for arch in torchvision.models.list_models(module=torchvision.models.video):
        check_backbone_name(f"torchvision:{arch}")
    for name in ("small_r3d", "small_r2plus1d", "per_frame"):
        check_backbone_name(name)
        assert name in BACKBONES
    check_backbone_name("torchvision:resnet18")  # image names unchanged
    with pytest.raises(BackboneError, match="torchvision has no model 'r3d18'.*video models: torchvision:r3d_18"):
        check_backbone_name("torchvision:r3d18")
    with pytest.raises(BackboneError, match="torchvision has no model 'nonsense'"):
        check_backbone_name("torchvision:nonsense")
    with pytest.raises(BackboneError, match=r"unknown backbone 'r2plus1d' \(did you mean .*torchvision:r2plus1d_18"):
        check_backbone_name("r2plus1d")
    with pytest.raises(BackboneError, match="timm has no model 'r3d_18'"):
        check_backbone_name("timm:r3d_18")


def test_params_pass_through():
    net = build_backbone("small_r3d", 1, 32, widths=[8, 16, 24], blocks=2, stem_stride=1, temporal_strides=[2, 1])
    assert net.num_features == 24 and len(net.stages) == 4
    maps = net.stages(net.stem(torch.zeros(1, 1, 8, 32, 32)))
    assert maps.shape == (1, 24, 4, 8, 8)  # T / 2 / 1, H / 1 / 2 / 2
    default = build_backbone("small_r2plus1d", 1, 32, widths=[8, 16, 24, 32])
    assert default.stages(default.stem(torch.zeros(1, 1, 8, 32, 32))).shape == (1, 32, 2, 2, 2)  # T: /1, /2, /2
    tv = build_backbone("torchvision:swin3d_t", 3, 32, mlp_ratio=2.0)  # a SwinTransformer3d argument
    assert {m.out_features for m in tv.net.features[0][0].mlp.modules() if isinstance(m, nn.Linear)} == {192, 96}
    assert tv.kwargs == {"mlp_ratio": 2.0}  # recorded, as export rebuilds the network from it
    with pytest.raises(BackboneError, match="does not take these backbone.params"):
        build_backbone("torchvision:r3d_18", 3, 32, depth=3)
    with pytest.raises(BackboneError, match="may not set weights"):
        build_backbone("torchvision:r3d_18", 3, 32, weights="DEFAULT")
    with pytest.raises(BackboneError, match=r"'small_r3d' has no parameter\(s\) patch_size"):
        build_backbone("small_r3d", 1, 32, patch_size=4)


@pytest.mark.parametrize("kwargs, message", [({"stem_stride": 3}, "stem_stride must be 1 or 2"),
                                             ({"widths": []}, "widths must be a non-empty list"),
                                             ({"blocks": 0}, "blocks must be a positive integer"),
                                             ({"widths": [8, 16, 32], "temporal_strides": [2]},
                                              "temporal_strides must give 1 or 2 for each of the 2 stages")])
def test_small_r3d_rejects_bad_settings(kwargs, message):
    with pytest.raises(BackboneError, match=message):
        build_backbone("small_r3d", 1, 32, **kwargs)


def test_r2plus1d_blocks_keep_the_3d_convs_parameter_count():
    r3d = build_backbone("small_r3d", 3, 32, widths=[16, 32, 64])
    r21d = build_backbone("small_r2plus1d", 3, 32, widths=[16, 32, 64])
    def convs(net: nn.Module) -> int:
        return sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Conv3d))

    assert abs(convs(r21d) - convs(r3d)) / convs(r3d) < 0.02  # Tran et al.'s M_i; rounding down loses a little
    assert all(m.kernel_size in ((1, 3, 3), (3, 1, 1), (1, 1, 1)) for m in r21d.modules() if isinstance(m, nn.Conv3d))


def test_per_frame_runs_the_image_backbone_on_each_frame():
    net = build_backbone("per_frame", 1, 32, frame_backbone="small_resnet", frame_params={"widths": [8, 16]})
    assert type(net.frame).__name__ == "SmallResNet" and net.num_features == net.frame.num_features == 16
    net.eval()  # batch-norm statistics would otherwise depend on how frames are batched
    x = torch.randn(2, 1, 3, 32, 32)
    feats = net.frame_features(x)
    assert feats.shape == (2, 3, 16)
    torch.testing.assert_close(feats[1, 2], net.frame(x[1:2, :, 2])[0])
    torch.testing.assert_close(net(x), feats.mean(dim=1))
    image_encoder = build_backbone("small_resnet", 1, 32, widths=[8, 16])
    image_encoder.load_state_dict(net.frame.state_dict())  # its weights are an image encoder's


def test_per_frame_takes_any_image_backbone_and_refuses_clip_backbones():
    net = build_backbone("per_frame", 3, 32, frame_backbone="torchvision:mobilenet_v3_small")
    assert net(torch.randn(2, 3, 2, 32, 32)).shape == (2, net.frame.num_features)
    with pytest.raises(BackboneError, match="frame_backbone must be an image backbone, 'small_r3d' takes clips"):
        build_backbone("per_frame", 1, 32, frame_backbone="small_r3d")
    with pytest.raises(BackboneError, match="per_frame: frame_backbone 'nope': unknown backbone 'nope'"):
        build_backbone("per_frame", 1, 32, frame_backbone="nope")
    with pytest.raises(BackboneError, match="per_frame: frame_backbone 'small_resnet': .*no parameter"):
        build_backbone("per_frame", 1, 32, frame_params={"depth": 2})


def test_video_backbones_never_touch_the_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a backbone build tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    build_backbone("torchvision:mc3_18", 3, 32)
