"""OPN (Lee et al. 2017): the 12 classes (a permutation and its reverse one class) checked on every drawn order
against the frames' own times, frames from a moving window frame_gap apart, static clips dropped, per-frame
jitter and channel splitting, the loss against a naive loop, gradients and fitting on a fixed batch."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from temporal_stand_ins import (PROGRESS, TinyClipNet, TinyFrameNet, frame_time, gradients_reach_every_parameter,
                                steps_lower_the_loss, time_coded)

from selfsup.methods import METHODS
from selfsup.methods.opn import OPN, jitter_frames, split_channels
from selfsup.methods.temporal_order import sample_motion_windows
from selfsup.views.clips import ClipRecipe

pytestmark = pytest.mark.usefixtures("one_thread")


def method(**kw) -> OPN:
    kw = {"frame_gap": 1, "frame_dim": 8, "pair_dim": 8, **kw}
    return OPN(TinyFrameNet(1, 6), **kw)


def naive_class(order: tuple[int, ...]) -> int:
    """OPN's class of the order in which the frames are shown: p and reversed p one class, classes numbered by the
    sorted smaller of the two."""
    canonical = sorted({min(p, p[::-1]) for p in itertools.permutations(range(len(order)))})
    return canonical.index(min(order, order[::-1]))


def test_registered_as_a_clip_pretext_method_with_12_classes():
    info = METHODS["opn"]
    assert info.cls is OPN and info.family == "pretext" and "1708.01246" in info.paper
    spec = OPN.spec
    assert spec.inputs == "clips" and isinstance(spec.views, ClipRecipe) and spec.views.clips == 1
    m = OPN(TinyClipNet())
    assert m.head.classifier[0].out_features == 12 and m.span == 7 and m.check_run(100, 8, spec.views) == []


def test_every_permutation_gets_its_class_and_a_sequence_and_its_reverse_share_one():
    m = method(frame_gap=2)
    x = time_coded(96, 10)  # span 7: windows start at 0..3
    by_order: dict[tuple[int, ...], set[int]] = {}
    for _ in range(4):
        frames, labels, idx, keep = m.shuffled_frames(x)
        assert keep.all() and frames.shape == (96, 4, 1, 8, 8)
        for b in range(96):
            times = [frame_time(frames[b, k]) for k in range(4)]
            start = min(times)
            assert sorted(times) == [start + 2 * k for k in range(4)]  # four frames frame_gap apart in one window
            order = tuple((t - start) // 2 for t in times)
            assert order == tuple(m.perms[idx[b]].tolist())  # shown k-th: the frame at perms[idx, k]
            assert int(labels[b]) == naive_class(order)
            by_order.setdefault(order, set()).add(int(labels[b]))
    assert len(by_order) == 24  # every permutation drawn
    for order, classes in by_order.items():
        assert len(classes) == 1 and classes == by_order[order[::-1]]  # p and reversed p: one class
    assert len({c for cs in by_order.values() for c in cs}) == 12


def test_static_clips_are_dropped_and_windows_are_where_things_move():
    m = method(frame_gap=1, motion_threshold=0.01)
    x = torch.zeros(3, 1, 10, 8, 8)
    x[0, :, 6:] = torch.rand(4, 8, 8)  # clip 0 moves in frames 6..9 only
    x[1] = torch.rand(1, 8, 8)  # clip 1 static
    x[2] = torch.rand(1, 10, 8, 8)  # clip 2 moves throughout
    for _ in range(20):
        frames, _, _, keep = m.shuffled_frames(x)
        assert keep.tolist() == [True, False, True]
        window = frames[0]  # windows of 4 frames must contain a moving step: start ≥ 2
        assert any(not torch.equal(window[k], x[0, :, 0]) for k in range(4))


def test_jitter_crops_each_frame_at_its_own_place_and_channel_split_copies_one_channel():
    frames = torch.arange(2 * 3 * 1 * 8 * 8, dtype=torch.float32).view(2, 3, 1, 8, 8)
    out = jitter_frames(frames, 2)
    assert out.shape == (2, 3, 1, 6, 6)
    for b in range(2):
        for k in range(3):
            top, left = divmod(int(out[b, k, 0, 0, 0] - frames[b, k, 0, 0, 0]), 8)
            assert 0 <= top <= 2 and 0 <= left <= 2
            assert torch.equal(out[b, k], frames[b, k, :, top : top + 6, left : left + 6])
    offsets = {int(out[b, k, 0, 0, 0] - frames[b, k, 0, 0, 0]) for b in range(2) for k in range(3)}
    assert len(offsets) > 1  # per frame, not per clip
    assert jitter_frames(frames, 0) is frames
    rgb = torch.randn(4, 4, 3, 5, 5)
    split = split_channels(rgb)
    for b in range(4):
        for k in range(4):
            assert any(torch.equal(split[b, k], rgb[b, k, c : c + 1].expand(3, -1, -1)) for c in range(3))
    grey = torch.randn(2, 4, 1, 5, 5)
    assert split_channels(grey) is grey


def naive_loss(m: OPN, x: torch.Tensor, starts: torch.Tensor, motion: torch.Tensor, idx: torch.Tensor):
    lin = lambda layer, v: layer.weight @ v + layer.bias
    orders = list(itertools.permutations(range(m.frames)))
    terms = []
    for b in range(x.shape[0]):
        if motion[b] < m.motion_threshold:
            continue
        order = orders[int(idx[b])]
        shown = [x[b, :, int(starts[b]) + m.frame_gap * order[k]] for k in range(m.frames)]
        f = [torch.relu(lin(m.head.item_fc[0], m.backbone(fr[None, :, None])[0])) for fr in shown]
        pairs = [torch.relu(lin(m.head.pair_fc[0], torch.cat([f[i], f[j]])))
                 for i in range(m.frames) for j in range(i + 1, m.frames)]
        logits = lin(m.head.classifier[0], torch.cat(pairs))
        terms.append(-F.log_softmax(logits, 0)[naive_class(order)])
    return sum(terms) / len(terms)


@pytest.mark.parametrize("backbone", [TinyFrameNet, TinyClipNet])
def test_loss_matches_a_naive_reference(backbone):
    m = OPN(backbone(1, 6), frame_gap=2, frame_dim=8, pair_dim=8, dropout=0.0)
    x = torch.randn(6, 1, 9, 8, 8)
    x[2] = x[2, :, :1].expand_as(x[2])  # static: out of the loss
    torch.manual_seed(5)
    loss, logs = m.training_step([x], PROGRESS)
    torch.manual_seed(5)  # the method's draws, in its order: the windows, then the orders
    starts, motion = sample_motion_windows(x, m.span)
    idx = torch.randint(24, (6,))
    torch.testing.assert_close(loss, naive_loss(m, x, starts, motion, idx))
    assert float(logs["kept"]) == 5


@pytest.mark.parametrize("kw", [{}, {"jitter": 2, "channel_split": True}])
def test_gradients_reach_every_parameter_and_steps_lower_the_loss(kw):
    x = torch.randn(8, 3 if kw else 1, 8, 10, 10)
    make = lambda: OPN(TinyFrameNet(x.shape[1], 6), frame_gap=1, frame_dim=8, pair_dim=8, **kw)
    gradients_reach_every_parameter(make(), [x])
    steps_lower_the_loss(make(), [x])


def test_with_the_default_per_frame_backbone_when_present():
    from selfsup.nn.backbones import BACKBONES, build_backbone

    if "per_frame" not in BACKBONES:
        pytest.skip("selfsup.nn.video has not registered per_frame yet")
    assert OPN.spec.default_backbone == "per_frame"
    m = OPN(build_backbone("per_frame", 1, 16, frame_params={"widths": [8, 16]}), frame_gap=1, frame_dim=8, pair_dim=8)
    gradients_reach_every_parameter(m, [torch.randn(4, 1, 6, 16, 16)])


def test_views_too_short_and_bad_settings_are_refused():
    m = OPN(TinyClipNet())
    (problem,) = m.check_run(100, 8, ClipRecipe(clip_len=4, clips=1))
    assert "at least 7 frames" in problem
    with pytest.raises(ValueError, match="T ≥ 7"):
        m.training_step([torch.randn(2, 1, 4, 8, 8)], PROGRESS)
    with pytest.raises(ValueError, match="frames must be 3–5"):
        OPN(TinyClipNet(), frames=6)
    with pytest.raises(ValueError, match="frame_gap"):
        OPN(TinyClipNet(), frame_gap=0)
