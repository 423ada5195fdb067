"""Clip views (selfsup.views.clips) and the clip collection (selfsup.data.clips)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from selfsup.config import ConfigError
from selfsup.data.clips import ClipSet, is_clips
from selfsup.data.imageset import DataError, ImageSet
from selfsup.views import Augment
from selfsup.views.clips import (ClipRecipe, apply_clip_overrides, augment_clip, center_clip, fixed_shuffle,
                                 make_clip_views, random_clip, resolve_clip_sizes, take_frames)

pytestmark = pytest.mark.usefixtures("one_thread")


def numbered_records(n: int, frames: int, channels: int = 1, size: int = 8) -> torch.Tensor:
    """uint8 (N, L·C, S, S) whose every pixel of frame t of record i holds 10·t + i (readable after any crop)."""
    t = torch.arange(frames).view(1, frames, 1, 1, 1)
    i = torch.arange(n).view(n, 1, 1, 1, 1)
    x = (10 * t + i).expand(n, frames, channels, size, size)
    return x.reshape(n, frames * channels, size, size).to(torch.uint8).contiguous()


def test_take_frames_gathers_strided_frames_from_each_start():
    clips = numbered_records(3, 12).unflatten(1, (12, 1))
    starts = torch.tensor([0, 2, 5])
    out = take_frames(clips, starts, clip_len=3, stride=3)
    assert out.shape == (3, 3, 1, 8, 8)
    for b, s in enumerate(starts.tolist()):
        assert out[b, :, 0, 0, 0].tolist() == [10 * (s + 3 * k) + b for k in range(3)]


def test_clip_views_shapes_temporal_jitter_and_layout():
    torch.manual_seed(0)
    recipe = resolve_clip_sizes(ClipRecipe(clip_len=4, stride=2, clips=2, augment=Augment.identity()), 8, 12)
    records = numbered_records(64, 12)
    views = make_clip_views(records, recipe, mean=[0.0], std=[1 / 255])  # normalised back to the pixel values
    assert len(views) == 2 and all(v.shape == (64, 1, 4, 8, 8) for v in views)
    for v in views:
        values = v[:, 0, :, 0, 0].round()  # (B, T): 10·frame + record
        frames = (values - torch.arange(64)[:, None]) / 10
        assert torch.equal(frames[:, 1:] - frames[:, :-1], torch.full((64, 3), 2.0))  # stride 2
        assert frames.min() >= 0 and frames.max() <= 11
    starts = [((v[:, 0, 0, 0, 0].round() - torch.arange(64)) / 10) for v in views]
    assert len(torch.unique(starts[0])) > 3  # random starts: the temporal jitter
    assert not torch.equal(starts[0], starts[1])  # each view draws its own start
    same = make_clip_views(records, dataclasses.replace(recipe, same_start=True), [0.0], [1 / 255])
    assert torch.equal(same[0], same[1])  # identity augmentation and the same start: identical views


def test_clip_augmentation_is_the_same_on_every_frame():
    """One crop, flip and colour jitter per clip: frames that were equal stay equal after augmentation."""
    torch.manual_seed(1)
    frame = torch.rand(6, 1, 3, 16, 16)
    x = frame.expand(6, 4, 3, 16, 16).contiguous()  # four identical frames
    a = Augment(size=8, scale=(0.2, 0.6), jitter_p=1.0, gray_p=0.5, blur_p=1.0, solarize_p=0.5)
    y = augment_clip(x, a)
    assert y.shape == (6, 4, 3, 8, 8)
    assert torch.allclose(y[:, 1:], y[:, :1].expand_as(y[:, 1:]), atol=1e-6)
    assert not torch.allclose(y[0], y[1])  # but different clips are augmented differently


def test_center_clip_modes():
    records = numbered_records(2, 12)
    x = center_clip(records, None, 8, clip_len=4, stride=2, channels=1)
    assert x.shape == (2, 1, 4, 8, 8)
    assert (x[0, 0, :, 0, 0] * 255).round().tolist() == [20, 40, 60, 80]  # span 7 centred in 12 frames: 2..8
    centre = center_clip(records, None, 8, 4, 2, 1, frames="centre")
    assert centre.shape == (2, 1, 1, 8, 8) and round(float(centre[0, 0, 0, 0, 0]) * 255) == 60
    shuffled = center_clip(records, None, 8, 4, 2, 1, frames="shuffled")
    assert torch.equal(shuffled[:, :, fixed_shuffle(4).argsort()], x)
    with pytest.raises(ValueError, match="spans 13 frames"):
        center_clip(records, None, 8, clip_len=7, stride=2, channels=1)


@pytest.mark.parametrize("n", range(2, 12))
def test_fixed_shuffle_moves_every_frame(n):
    order = fixed_shuffle(n)
    assert sorted(order.tolist()) == list(range(n)) and bool((order != torch.arange(n)).all())
    assert torch.equal(order, fixed_shuffle(n))


def test_random_clip_crops_every_frame_alike():
    torch.manual_seed(2)
    records = numbered_records(5, 10, channels=3, size=16)
    out = random_clip(records, 3, clip_len=3, stride=3, size=8, scale=(0.3, 1.0), flip_p=0.5)
    assert out.shape == (5, 3, 3, 8, 8)
    values = (out * 255).round()
    assert bool((values == values[..., :1, :1]).all())  # constant frames stay constant: one value per frame


def test_overrides_and_checks_name_every_problem():
    r = apply_clip_overrides(ClipRecipe(), {"clip_len": 4, "stride": 3, "flip_p": 0.0})
    assert (r.clip_len, r.stride, r.augment.flip_p) == (4, 3, 0.0)
    with pytest.raises(ConfigError, match="did you mean 'clip_len'"):
        apply_clip_overrides(ClipRecipe(), {"clip_length": 4})
    with pytest.raises(ConfigError, match="span 15 frames, more than the 12"):
        resolve_clip_sizes(ClipRecipe(clip_len=8, stride=2), 16, 12)
    with pytest.raises(ConfigError, match="views.clips must be an integer"):
        resolve_clip_sizes(ClipRecipe(clips=0), 16, 12)
    assert resolve_clip_sizes(ClipRecipe(), 16, 16).augment.size == 16


def clip_set(n: int = 6, frames: int = 4, channels: int = 1) -> ClipSet:
    records = ImageSet(numbered_records(n, frames, channels), torch.arange(n) % 2, ["a", "b"], "clips")
    return ClipSet(records, frames, video=torch.arange(n) // 2,
                   extra_labels={"direction": torch.arange(n) % 3}, extra_classes={"direction": ["n", "e", "s"]})


def test_clip_set_delegates_and_keeps_what_a_clip_means():
    clips = clip_set(channels=3)
    assert is_clips(clips) and not is_clips(clips.records)
    assert (len(clips), clips.channels, clips.frames, clips.image_size) == (6, 3, 4, 8)
    assert clips.batch([1, 0]).shape == (2, 12, 8, 8)
    assert clips.frames_of(clips.batch([0])).shape == (1, 4, 3, 8, 8)
    sub = clips.subset([5, 1])
    assert sub.video.tolist() == [2, 0] and sub.extra_labels["direction"].tolist() == [2, 1]
    assert sub.labels.tolist() == [1, 1] and sub.frames == 4 and sub.channels == 3
    by_direction = clips.with_labels("direction")
    assert by_direction.labels.tolist() == [0, 1, 2, 0, 1, 2] and by_direction.classes == ["n", "e", "s"]
    assert clips.labels.tolist() == [0, 1, 0, 1, 0, 1]  # the original keeps its own labels
    with pytest.raises(DataError, match="no 'family' labels"):
        clips.with_labels("family")
    assert clips.with_eval(2, 2).eval_clip == (2, 2) and clips.eval_clip == (4, 1)
    with pytest.raises(DataError, match="longer than its 4-frame records"):
        clips.with_eval(3, 2)
    assert "6 clips of 4 frames from 3 videos" in clips.describe()


def test_clip_set_mean_std_pools_the_frames():
    clips = clip_set(n=4, frames=4, channels=1)
    mean, std = clips.mean_std()
    values = clips.batch(torch.arange(4)).double() / 255
    assert mean[0] == pytest.approx(float(values.mean()), abs=1e-6)
    assert std[0] == pytest.approx(float(values.std()), rel=1e-3)


def test_clip_set_refuses_records_that_do_not_hold_whole_frames():
    records = ImageSet(numbered_records(2, 5), name="odd")
    with pytest.raises(DataError, match="cannot hold 2 frames"):
        ClipSet(records, 2)
