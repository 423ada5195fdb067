"""Shuffle and Learn (Misra et al. 2016): five ordered frames in one moving window, positives with the middle frame
between the outer two (either direction), negatives with it outside, the 1:3 class ratio per batch, static clips
dropped, the loss against a naive loop, gradients and fitting on a fixed batch."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from temporal_stand_ins import (PROGRESS, TinyClipNet, TinyFrameNet, frame_time, gradients_reach_every_parameter,
                                steps_lower_the_loss, time_coded)

from selfsup.methods import METHODS
from selfsup.methods.shuffle_and_learn import ShuffleAndLearn, five_frames, make_triplets
from selfsup.methods.temporal_order import balanced_labels, sample_motion_windows
from selfsup.views.clips import ClipRecipe

pytestmark = pytest.mark.usefixtures("one_thread")


def method(**kw) -> ShuffleAndLearn:
    kw = {"window": 6, "frame_dim": 8, **kw}
    return ShuffleAndLearn(TinyFrameNet(1, 6), **kw)


def test_registered_as_a_clip_pretext_method():
    info = METHODS["shuffle_and_learn"]
    assert info.cls is ShuffleAndLearn and info.family == "pretext" and "1603.08561" in info.paper
    spec = ShuffleAndLearn.spec
    assert spec.inputs == "clips" and isinstance(spec.views, ClipRecipe) and spec.views.clips == 1
    assert ShuffleAndLearn(TinyClipNet()).check_run(100, 8, spec.views) == []


def test_five_frames_are_distinct_ordered_and_inside_the_window():
    starts = torch.tensor([0, 3, 7] * 100)
    five = five_frames(starts, 6)
    assert five.shape == (300, 5)
    assert (five[:, 1:] > five[:, :-1]).all()
    assert ((five >= starts[:, None]) & (five < starts[:, None] + 6)).all()
    assert len({tuple((f - s).tolist()) for f, s in zip(five, starts)}) == 6  # all C(6, 5) subsets drawn
    with pytest.raises(ValueError, match="5 distinct"):
        five_frames(starts, 4)


def test_every_flag_combination_builds_the_right_triplet():
    five = torch.tensor([[10, 11, 12, 13, 14]])
    a, b, c, d, e = 10, 11, 12, 13, 14
    for positive, backwards, use_first in itertools.product([False, True], repeat=3):
        flags = [torch.tensor([v]) for v in (positive, backwards, use_first)]
        got = make_triplets(five, *flags)[0].tolist()
        middle = c if positive else (a if use_first else e)
        assert got == ([d, middle, b] if backwards else [b, middle, d])
        lo, hi = sorted((got[0], got[2]))
        assert (lo < got[1] < hi) == positive  # the label: is the middle frame between the outer two


def test_triplets_are_labelled_by_their_frames_with_one_positive_in_four():
    m = method(window=8)
    x = time_coded(40, 12)
    directions = set()
    for _ in range(5):
        frames, labels, keep = m.triplets(x)
        assert keep.all() and frames.shape == (40, 3, 1, 8, 8) and int(labels.sum()) == 10  # 1:3 exactly
        for i in range(40):
            t = [frame_time(frames[i, k]) for k in range(3)]
            assert all(int(frames[i, k, 0, 0, 0]) // 100 == i for k in range(3))  # frames of its own clip
            lo, hi = sorted((t[0], t[2]))
            assert len(set(t)) == 3 and hi - lo < 8 and max(t) - min(t) < 8  # distinct, inside one window
            assert bool(labels[i]) == (lo < t[1] < hi)
            directions.add((bool(labels[i]), t[0] < t[2]))
    assert directions == {(True, True), (True, False), (False, True), (False, False)}  # both ways, both labels


def test_static_clips_are_dropped():
    m = method()
    x = torch.rand(4, 1, 8, 8, 8)
    x[[0, 3]] = x[[0, 3], :, :1].expand(-1, -1, 8, -1, -1)
    _, _, keep = m.triplets(x)
    assert keep.tolist() == [False, True, True, False]
    loss, logs = m.training_step([x], PROGRESS)
    assert float(logs["kept"]) == 2 and torch.isfinite(loss)


def naive_loss(m: ShuffleAndLearn, x, starts, motion, five, positive, backwards, use_first):
    lin = lambda layer, v: layer.weight @ v + layer.bias
    terms = []
    for i in range(x.shape[0]):
        if motion[i] < m.motion_threshold:
            continue
        a, b, c, d, e = five[i].tolist()
        middle = c if positive[i] else (a if use_first[i] else e)
        order = [d, middle, b] if backwards[i] else [b, middle, d]
        feats = [torch.relu(lin(m.frame_fc[0], m.backbone(x[i, :, p][None, :, None])[0])) for p in order]
        logits = lin(m.classifier[0], torch.cat(feats))
        terms.append(-F.log_softmax(logits, 0)[int(positive[i])])
    return sum(terms) / len(terms)


@pytest.mark.parametrize("backbone", [TinyFrameNet, TinyClipNet])
def test_loss_matches_a_naive_reference(backbone):
    m = ShuffleAndLearn(backbone(1, 6), window=6, frame_dim=8)
    x = torch.randn(8, 1, 9, 8, 8)
    x[5] = x[5, :, :1].expand_as(x[5])
    torch.manual_seed(11)
    loss, logs = m.training_step([x], PROGRESS)
    torch.manual_seed(11)  # the method's draws, in its order
    starts, motion = sample_motion_windows(x, 6)
    five = five_frames(starts, 6)
    positive = balanced_labels(8, 0.25)
    backwards, use_first = torch.rand(8) < 0.5, torch.rand(8) < 0.5
    torch.testing.assert_close(loss, naive_loss(m, x, starts, motion, five, positive, backwards, use_first))
    assert float(logs["kept"]) == 7


def test_gradients_reach_every_parameter_and_steps_lower_the_loss():
    x = torch.randn(8, 1, 8, 8, 8)
    gradients_reach_every_parameter(method(), [x])
    steps_lower_the_loss(method(), [x])


def test_with_the_default_per_frame_backbone_when_present():
    from selfsup.nn.backbones import BACKBONES, build_backbone

    if "per_frame" not in BACKBONES:
        pytest.skip("selfsup.nn.video has not registered per_frame yet")
    assert ShuffleAndLearn.spec.default_backbone == "per_frame"
    m = ShuffleAndLearn(build_backbone("per_frame", 1, 16, frame_params={"widths": [8, 16]}), window=6, frame_dim=8)
    gradients_reach_every_parameter(m, [torch.randn(4, 1, 8, 16, 16)])


def test_views_too_short_and_bad_settings_are_refused():
    m = ShuffleAndLearn(TinyClipNet())
    (problem,) = m.check_run(100, 8, ClipRecipe(clip_len=8, clips=1))
    assert "at least 10 frames" in problem and "window" in problem
    with pytest.raises(ValueError, match="T ≥ 10"):
        m.training_step([torch.randn(2, 1, 8, 8, 8)], PROGRESS)
    for kw, msg in [({"window": 4}, "window"), ({"positive_fraction": 0.0}, "positive_fraction"),
                    ({"motion_threshold": -1.0}, "motion_threshold")]:
        with pytest.raises(ValueError, match=msg):
            ShuffleAndLearn(TinyClipNet(), **kw)
