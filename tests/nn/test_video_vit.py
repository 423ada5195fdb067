"""The tubelet video ViT (VideoMAE's encoder, arXiv:2203.12602): tubelet layout, 3-D sin-cos positions, shapes for
any clip length divisible by the tubelet, the visible-token encoder, gradients."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from selfsup.nn.backbones import BackboneError, build_backbone
from selfsup.nn.video_vit import VideoViT, sincos_pos_embed_3d, tubelet_patchify, tubelet_unpatchify

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"patch_size": 4, "width": 24, "depth": 1, "heads": 2, "frames": 4}


def tiny(image_size: int = 16, **kw) -> VideoViT:
    torch.manual_seed(0)
    return build_backbone("video_vit", 1, image_size, **{**TINY, **kw})


def test_registered_contract_and_defaults():
    b = tiny()
    assert isinstance(b, VideoViT) and b.input_kind == "clips"
    assert (b.num_features, b.in_chans, b.image_size, b.min_frames) == (24, 1, 16, 2)
    d = build_backbone("video_vit", 3, 64, depth=1)
    assert (d.patch_size, d.tubelet, d.width, d.frames, d.grid) == (8, 2, 192, 8, (4, 8, 8))
    with pytest.raises(BackboneError, match="has no parameter"):
        build_backbone("video_vit", 1, 16, embed_dim=8)
    with pytest.raises(BackboneError, match="not divisible by the patch size"):
        build_backbone("video_vit", 1, 18, **TINY)
    with pytest.raises(BackboneError, match="multiple of the tubelet"):
        build_backbone("video_vit", 1, 16, **{**TINY, "frames": 3})


@pytest.mark.parametrize("frames,size", [(2, 16), (4, 16), (6, 16), (8, 8), (4, 24)])
def test_any_clip_length_divisible_by_the_tubelet(frames, size):
    b = tiny()
    x = torch.randn(3, 1, frames, size, size)
    assert b.token_grid(x) == (frames // 2, size // 4, size // 4)
    assert b(x).shape == (3, 24)
    assert b.forward_tokens(x).shape == (3, (frames // 2) * (size // 4) ** 2, 24)


def test_bad_clips_say_what_is_wrong():
    b = tiny()
    with pytest.raises(ValueError, match="multiple of 2"):
        b(torch.randn(1, 1, 5, 16, 16))
    with pytest.raises(ValueError, match="takes clips"):
        b(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="1-channel"):
        b(torch.randn(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        b(torch.randn(1, 1, 4, 18, 18))
    assert b.input_problem(16) is None and b.input_problem(8) is None
    assert "multiple of 4" in b.input_problem(18) and b.input_problem(2) is not None


def test_tubelet_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 4, 8, 12)
    t, p = 2, 4
    rows = tubelet_patchify(x, t, p)
    assert rows.shape == (2, 2 * 2 * 3, t * p * p * 3)
    assert torch.equal(tubelet_unpatchify(rows, t, p, (2, 2, 3)), x)
    for i in range(2):  # naive: token (i, j, k) in (time, row, column) raster order holds its tube as (t, row, col, c)
        for j in range(2):
            for k in range(3):
                tube = x[:, :, i * t:(i + 1) * t, j * p:(j + 1) * p, k * p:(k + 1) * p]
                assert torch.equal(rows[:, (i * 2 + j) * 3 + k], tube.permute(0, 2, 3, 4, 1).reshape(2, -1))
    with pytest.raises(ValueError, match="tubelets"):
        tubelet_patchify(torch.randn(1, 1, 3, 8, 8), 2, 4)


def test_tokens_are_the_tubelet_projection_in_target_order():
    """Token n is the Conv3d of tube n of tubelet_patchify (the reconstruction target): one order for both."""
    b = tiny()
    x = torch.randn(2, 1, 4, 16, 16)
    emb = b.patch_embed(x).flatten(2).transpose(1, 2)
    w = b.patch_embed.weight.permute(0, 2, 3, 4, 1).reshape(b.width, -1)  # (D, t·p·p·C) in (t, row, col, c)
    ref = tubelet_patchify(x, 2, 4) @ w.T + b.patch_embed.bias
    torch.testing.assert_close(emb, ref, rtol=1e-5, atol=1e-5)


def _naive_sincos(d: int, pos: float) -> list[float]:
    freqs = [1.0 / 10000 ** (m / (d / 2)) for m in range(d // 2)]
    return [math.sin(pos * f) for f in freqs] + [math.cos(pos * f) for f in freqs]


@pytest.mark.parametrize("dim,grid", [(24, (2, 2, 3)), (16, (3, 1, 2)), (10, (2, 2, 2))])
def test_sincos_3d_matches_naive(dim, grid):
    emb = sincos_pos_embed_3d(dim, grid)
    dt = dim // 4 // 2 * 2
    dh = (dim - dt) // 2 // 2 * 2
    dw = dim - dt - dh
    gt, gh, gw = grid
    assert emb.shape == (gt * gh * gw, dim)
    for i in range(gt):
        for j in range(gh):
            for k in range(gw):
                ref = _naive_sincos(dt, i) + _naive_sincos(dh, j) + _naive_sincos(dw, k)
                torch.testing.assert_close(emb[(i * gh + j) * gw + k], torch.tensor(ref), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="even width"):
        sincos_pos_embed_3d(7, grid)


def test_positions_are_built_for_the_clip_length_seen():
    """Longer clips extend the temporal table (same spacing), so the first tubelets keep their positions."""
    b = tiny()
    short, long = b.pos_embed_for((2, 4, 4)), b.pos_embed_for((5, 4, 4))
    assert torch.equal(long[:, :short.shape[1]], short)
    other = b.pos_embed_for((2, 2, 2))  # another frame size: spread over the training grid's range
    torch.testing.assert_close(other[0], sincos_pos_embed_3d(24, (2, 2, 2), extent=(4, 4)))
    assert not any("pos" in k for k in b.state_dict())  # fixed: a checkpoint loads at any clip length
    VideoViT(1, 16, 4, 2, 24, 1, 2, frames=8).load_state_dict(b.state_dict())


def test_forward_visible_is_the_full_encoder_when_nothing_is_hidden():
    b = tiny().eval()
    x = torch.randn(2, 1, 4, 16, 16)
    full = b.forward_tokens(x)
    n = full.shape[1]
    torch.testing.assert_close(b.forward_visible(x, torch.arange(n).expand(2, n)), full)
    perm = torch.stack([torch.randperm(n) for _ in range(2)])  # attention is order-free: positions travel with tokens
    torch.testing.assert_close(b.forward_visible(x, perm), full.gather(1, perm[..., None].expand(-1, -1, 24)),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b(x), full.mean(dim=1))


def test_forward_visible_ignores_hidden_tubes():
    b = tiny().eval()
    x = torch.randn(1, 1, 4, 16, 16)
    keep = torch.tensor([[0, 5, 17, 30]])
    rows = tubelet_patchify(x, 2, 4)
    hidden = torch.ones(rows.shape[1], dtype=torch.bool)
    hidden[keep[0]] = False
    rows2 = rows.clone()
    rows2[:, hidden] = torch.randn_like(rows2[:, hidden])
    y = tubelet_unpatchify(rows2, 2, 4, (2, 4, 4))
    torch.testing.assert_close(b.forward_visible(x, keep), b.forward_visible(y, keep))
    assert b.forward_visible(x, keep).shape == (1, 4, 24)


def test_gradients_reach_every_parameter():
    b = tiny(depth=2)
    b(torch.randn(2, 1, 4, 16, 16)).pow(2).sum().backward()
    missing = [n for n, p in b.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_importing_the_name_does_not_import_timm():
    code = ("import sys; from selfsup.nn.backbones import BACKBONES; import selfsup.nn.video_vit; "
            "print('video_vit' in BACKBONES, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]
