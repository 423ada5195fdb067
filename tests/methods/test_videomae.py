"""VideoMAE (Tong et al. 2022, arXiv:2203.12602): tube masking, the loss against a naive reference written from the
paper, float64 gradcheck, gradients, a few steps lowering the loss, the spec."""
from __future__ import annotations

import pytest
import torch

from selfsup.losses.masked import masked_mse
from selfsup.methods import METHODS
from selfsup.methods.base import Progress
from selfsup.nn.backbones import build_backbone
from selfsup.nn.video_vit import tube_masking, tubelet_patchify, tubelet_unpatchify
from selfsup.views.clips import ClipRecipe

pytestmark = pytest.mark.usefixtures("one_thread")

VIDEOMAE = METHODS["videomae"].cls
BACKBONE = {"patch_size": 4, "width": 24, "depth": 1, "heads": 2, "frames": 4}
STEP = Progress(0, 10, 0, 10)


def tiny(image_size: int = 16, seed: int = 0, backbone: dict | None = None, **params):
    torch.manual_seed(seed)
    b = build_backbone("video_vit", 1, image_size, **{**BACKBONE, **(backbone or {})})
    return VIDEOMAE(b, **{**VIDEOMAE.spec.test_params, **params})


# ---------------------------------------------------------------- tube masking


@pytest.mark.parametrize("grid,ratio", [((4, 8, 8), 0.9), ((2, 4, 4), 0.75), ((3, 2, 3), 0.5), ((1, 5, 5), 0.9)])
def test_tube_mask_is_one_spatial_pattern_over_time_at_the_exact_ratio(grid, ratio):
    gt, gh, gw = grid
    s = gh * gw
    m = tube_masking(6, grid, ratio, generator=torch.Generator().manual_seed(0))
    kept = int(s * (1 - ratio))  # MAE's rounding of the visible count, on the spatial positions
    assert m.mask.shape == (6, gt * s) and m.spatial.shape == (6, s) and m.keep.shape == (6, gt * kept)
    assert (m.spatial.sum(dim=1) == s - kept).all()
    per_time = m.mask.view(6, gt, s)
    assert torch.equal(per_time, m.spatial[:, None].expand(-1, gt, -1))  # the same pattern at every time
    visible = torch.zeros_like(m.mask)
    visible.scatter_(1, m.keep, True)
    assert torch.equal(visible, ~m.mask)  # keep lists exactly the visible tokens, each once
    assert (m.keep.diff(dim=1) > 0).all()  # in token order


def test_tube_masks_differ_between_samples_and_draws():
    m = tube_masking(8, (2, 8, 8), 0.9, generator=torch.Generator().manual_seed(1))
    assert len({tuple(r.tolist()) for r in m.spatial}) == 8
    with pytest.raises(ValueError, match="keeps 0"):
        tube_masking(1, (2, 2, 2), 0.9)


# ---------------------------------------------------------------- the loss


def naive_videomae_loss(x: torch.Tensor, pred: torch.Tensor, spatial_hidden: torch.Tensor, t: int, p: int,
                        norm_pix: bool, eps: float = 1e-6) -> torch.Tensor:
    """VideoMAE's loss from the paper: for every hidden tube (a spatial position hidden at all times), each
    t×p×p tubelet's pixels, normalised by their own mean and (unbiased) std, against the prediction; MSE averaged
    over hidden tubelets. Loops over samples and tubelets, slicing the clip directly."""
    b, _, frames, h, w = x.shape
    gt, gh, gw = frames // t, h // p, w // p
    total, count = 0.0, 0
    for n in range(b):
        for i in range(gt):
            for j in range(gh):
                for k in range(gw):
                    if not spatial_hidden[n, j * gw + k]:
                        continue
                    tube = x[n, :, i * t:(i + 1) * t, j * p:(j + 1) * p, k * p:(k + 1) * p]
                    target = tube.permute(1, 2, 3, 0).reshape(-1)  # (frame, row, column, channel)
                    if norm_pix:
                        target = (target - target.mean()) / (target.var(unbiased=True) + eps).sqrt()
                    total = total + ((pred[n, (i * gh + j) * gw + k] - target) ** 2).mean()
                    count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_naive_reference(norm_pix):
    m = tiny(norm_pix_loss=norm_pix).eval()
    x = torch.randn(3, 1, 4, 16, 16)
    torch.manual_seed(5)
    loss, logs = m.training_step([x], STEP)
    torch.manual_seed(5)  # the same tube mask again
    pred, mask, _ = m.predict(x)
    ref = naive_videomae_loss(x, pred, mask.spatial, 2, 4, norm_pix)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(loss) and logs["z"].shape == (3, 24) and not logs["z"].requires_grad


def test_predictions_depend_on_visible_tubes_only():
    m = tiny().eval()
    x = torch.randn(2, 1, 4, 16, 16)
    mask = tube_masking(2, (2, 4, 4), 0.75)
    rows = tubelet_patchify(x, 2, 4)
    rows2 = torch.where(mask.mask[..., None], torch.randn_like(rows), rows)
    x2 = tubelet_unpatchify(rows2, 2, 4, (2, 4, 4))
    torch.testing.assert_close(m.predict(x, mask)[0], m.predict(x2, mask)[0])


def test_gradcheck_float64_tiny():
    m = tiny(image_size=4, backbone={"patch_size": 2, "width": 8, "heads": 2, "frames": 2},
             decoder_dim=8, decoder_heads=2, mask_ratio=0.5).double().eval()
    x = torch.randn(1, 1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    mask = tube_masking(1, (1, 2, 2), 0.5)

    def loss(x):
        pred, _, _ = m.predict(x, mask)
        return masked_mse(pred, m.pixel_targets(x), mask.mask)

    assert torch.autograd.gradcheck(loss, (x,), eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------- training


def test_gradients_reach_every_trainable_parameter():
    m = tiny(backbone={"depth": 2}, decoder_depth=2)
    loss, _ = m.training_step([torch.randn(2, 1, 4, 16, 16)], STEP)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing


def test_a_few_steps_on_a_fixed_batch_lower_the_loss():
    m = tiny()
    x = torch.randn(4, 1, 4, 16, 16)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)

    def step_loss(step: int) -> torch.Tensor:
        torch.manual_seed(123)  # one tube mask throughout: the change is the parameters'
        return m.training_step([x], Progress(step, 20, 0, 20))[0]

    first = step_loss(0).item()
    for i in range(15):
        loss = step_loss(i)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert step_loss(15).item() < 0.9 * first


def test_runs_on_other_clip_lengths_than_built_for():
    m = tiny()
    for frames in (2, 6, 8):
        loss, _ = m.training_step([torch.randn(2, 1, frames, 16, 16)], STEP)
        assert torch.isfinite(loss)


def test_spec_and_refusals():
    spec = VIDEOMAE.spec
    assert spec.inputs == "clips" and spec.default_backbone == "video_vit" and spec.pictures == ("reconstructions",)
    assert isinstance(spec.views, ClipRecipe)
    assert (spec.views.clip_len, spec.views.stride, spec.views.clips) == (8, 2, 1)
    a = spec.views.augment
    assert (a.jitter_p, a.gray_p, a.blur_p, a.solarize_p) == (0, 0, 0, 0) and a.flip_p == 0.5
    assert spec.micro_batches == "per_sample" and spec.stochastic_step
    assert VIDEOMAE(build_backbone("video_vit", 1, 64, depth=1)).mask_ratio == 0.9  # the paper's default
    with pytest.raises(ValueError, match="video_vit"):
        VIDEOMAE(build_backbone("small_resnet", 1, 16, widths=[8, 16]))
    with pytest.raises(ValueError, match="mask ratio"):
        tiny(mask_ratio=1.0)
    with pytest.raises(ValueError, match="decoder needs"):
        tiny(decoder_dim=30)


# ---------------------------------------------------------------- the report's picture


def test_reconstruct_pastes_visible_tubes_and_the_report_draws_strips(tmp_path):
    from selfsup.report.reconstructions import save_method_pictures

    method = tiny().eval()
    x = torch.randn(3, 1, 4, 16, 16)
    masked, recon = method.reconstruct(x)
    assert masked.shape == recon.shape == x.shape
    tubes = lambda v: tubelet_patchify(v, 2, 4)
    hidden = (tubes(masked) == 0).all(dim=-1)
    assert hidden.any() and (~hidden).any()
    torch.testing.assert_close(tubes(recon)[~hidden], tubes(x)[~hidden])
    # one spatial pattern over time: a hidden tube is hidden in both of its temporal positions
    assert torch.equal(hidden.view(3, 2, 16)[:, 0], hidden.view(3, 2, 16)[:, 1])
    path = save_method_pictures(method, torch.rand(2, 1, 4, 16, 16), tmp_path, [0.5], [0.25])
    assert path.name == "reconstructions.png" and path.stat().st_size > 0
