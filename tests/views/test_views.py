"""Augmentation statistics: parameters inside their ranges and drawn per sample."""
from __future__ import annotations


import pytest
import torch

from selfsup.config import ConfigError
from selfsup.views import ViewRecipe, apply_overrides, group_by_size, make_views, resolve_sizes
from selfsup.views.ops import color_jitter, gaussian_blur, resized_crop_flip, sample_crop_boxes, solarize


def test_crop_boxes_in_range_and_per_sample():
    cx, cy, w, h = sample_crop_boxes(20000, (0.08, 1.0), (3 / 4, 4 / 3), torch.device("cpu"))
    area, ratio = w * h, w / h
    assert (area >= 0.08 - 1e-6).all() and (area <= 1 + 1e-6).all()
    assert (ratio >= 3 / 4 - 1e-5).all() and (ratio <= 4 / 3 + 1e-5).all()
    assert ((cx - w / 2) >= -1e-6).all() and ((cx + w / 2) <= 1 + 1e-6).all()
    assert ((cy - h / 2) >= -1e-6).all() and ((cy + h / 2) <= 1 + 1e-6).all()
    assert area.unique().numel() > 19000, "crop areas must differ per sample"
    # log-ratio is uniform: its mean is near 0 and the area mean near the clipped U(0.08, 1) mean
    assert abs(ratio.log().mean()) < 0.01
    assert 0.45 < area.mean() < 0.6


def test_identity_crop_and_flip_are_exact():
    x = torch.rand(4, 3, 16, 16)
    same = resized_crop_flip(x, 16, (1.0, 1.0), (1.0, 1.0), flip_p=0.0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    flipped = resized_crop_flip(x, 16, (1.0, 1.0), (1.0, 1.0), flip_p=1.0)
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-5, rtol=0)


def test_jitter_blur_solarize_keep_range_and_differ_per_sample():
    x = torch.rand(64, 3, 16, 16)
    y = color_jitter(x.clone(), 1.0, 0.4, 0.4, 0.4, 0.1)
    assert y.min() >= 0 and y.max() <= 1
    change = (y - x).abs().mean(dim=(1, 2, 3))
    assert change.unique().numel() == 64
    z = gaussian_blur(x, 1.0, (0.1, 2.0))
    assert z.shape == x.shape and (z - x).abs().mean() > 0
    torch.testing.assert_close(z.mean(), x.mean(), atol=0.02, rtol=0)
    s = solarize(x, 1.0)
    torch.testing.assert_close(s, torch.where(x >= 0.5, 1 - x, x))


def test_jitter_on_one_channel_images():
    x = torch.rand(8, 1, 12, 12)
    y = color_jitter(x, 1.0, 0.4, 0.4, 0.4, 0.1)
    assert y.shape == x.shape


def test_make_views_multi_crop_and_grouping():
    batch = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    recipe = resolve_sizes(apply_overrides(ViewRecipe(), {"local_crops": 3, "blur_p": 0.0}), 28)
    views = make_views(batch, recipe, [0.5], [0.25])
    assert [v.shape[-1] for v in views] == [28, 28, 12, 12, 12]
    groups = group_by_size(views)
    assert [idx for idx, _ in groups] == [[0, 1], [2, 3, 4]] and groups[1][1].shape[0] == 15


def test_bad_view_overrides_listed_together():
    with pytest.raises(ConfigError) as err:
        resolve_sizes(apply_overrides(ViewRecipe(), {"local_crops": 2, "local_size": 40, "flip_p": 2.0}), 28)
    text = str(err.value)
    assert "bigger than global" in text and "flip_p" in text
    with pytest.raises(ConfigError, match="did you mean 'blur_p'"):
        apply_overrides(ViewRecipe(), {"blur_pp": 0.1})


def test_hue_rotation_matches_the_yiq_formula():
    """The folded per-sample RGB matrix equals rotating (I, Q) in YIQ space (reference written out here)."""
    from selfsup.views.ops import _rotate_hue

    x, angle = torch.rand(6, 3, 5, 7), torch.empty(6).uniform_(-3.2, 3.2)
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x.double())
    cos, sin = angle.double().cos().view(-1, 1, 1), angle.double().sin().view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    ref = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], 1))
    torch.testing.assert_close(_rotate_hue(x, angle), ref.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(_rotate_hue(x, torch.zeros(6)), x, atol=1e-5, rtol=0)


def test_normalize_per_channel_and_outside_inference_mode():
    from selfsup.views.recipe import normalize

    x = torch.rand(2, 3, 4, 4)
    with torch.inference_mode():
        normalize(x, [0.1, 0.2, 0.3], [0.5, 0.25, 2.0])  # caches the constants inside inference mode
    y = x.clone().requires_grad_()
    out = normalize(y, [0.1, 0.2, 0.3], [0.5, 0.25, 2.0])  # and they still work where autograd records
    out.sum().backward()
    ref = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(out.detach(), ref)
