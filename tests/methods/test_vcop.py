"""VCOP (Xu et al. 2019): clips cut in order with their gaps, every label's permutation really shuffles the clips
(exhaustively), the loss against a naive loop, errors before training, gradients and fitting on a fixed batch."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from temporal_stand_ins import (PROGRESS, TinyClipNet, frame_time, gradients_reach_every_parameter,
                                steps_lower_the_loss, time_coded)

from selfsup.methods import METHODS
from selfsup.methods.vcop import VCOP, cut_clips, tuple_frames
from selfsup.views.clips import ClipRecipe

pytestmark = pytest.mark.usefixtures("one_thread")


def method(**kw) -> VCOP:
    kw = {"clip_frames": 2, "gap": 1, "pair_dim": 8, **kw}
    return VCOP(TinyClipNet(1, 6), **kw)


def test_registered_as_a_clip_pretext_method_with_a_tuple_that_fits_its_views():
    info = METHODS["vcop"]
    assert info.cls is VCOP and info.family == "pretext" and "Xu" in info.paper
    spec = VCOP.spec
    assert spec.inputs == "clips" and isinstance(spec.views, ClipRecipe) and spec.views.clips == 1
    m = VCOP(TinyClipNet())
    assert m.frames_needed == tuple_frames(3, 4, 2) == 16 == spec.views.clip_len
    assert len(m.perms) == 6 and m.check_run(100, 8, spec.views) == []


def test_cut_clips_takes_n_clips_of_t_frames_with_gaps():
    x = time_coded(2, 12)
    clips = cut_clips(x, 3, 2, 1, offset=torch.tensor([0, 3]))
    assert clips.shape == (2, 3, 1, 2, 8, 8)
    for b, off in enumerate([0, 3]):
        for n in range(3):
            assert [frame_time(clips[b, n, :, t]) for t in range(2)] == [off + 3 * n, off + 3 * n + 1]
    with pytest.raises(ValueError, match="need views of 14 frames"):
        cut_clips(x, 3, 4, 1)


def test_every_label_names_the_permutation_that_shuffled_the_clips():
    m = method()
    x = time_coded(64, 8)  # 8 ≥ 3·2 + 2·1: offsets 0 or 1
    orders = [tuple(p) for p in itertools.permutations(range(3))]
    seen = set()
    for _ in range(4):
        shuffled, labels = m.shuffled_tuples(x)
        for b in range(64):
            starts = [frame_time(shuffled[b, k, :, 0]) for k in range(3)]
            offset = min(starts)
            positions = tuple((s - offset) // 3 for s in starts)  # temporal position of the clip shown k-th
            assert positions == orders[int(labels[b])]  # the label's permutation, lexicographic class order
            for k in range(3):  # each shown clip is whole: T consecutive frames
                assert [frame_time(shuffled[b, k, :, t]) for t in range(2)] == [starts[k], starts[k] + 1]
            unshuffled = shuffled[b][torch.tensor(orders[int(labels[b])]).argsort()]
            assert [frame_time(c[:, 0]) for c in unshuffled] == sorted(starts)  # sorting by the label restores time
            seen.add(int(labels[b]))
    assert seen == set(range(6))


def naive_loss(m: VCOP, x: torch.Tensor, offset: torch.Tensor, labels: torch.Tensor):
    orders = list(itertools.permutations(range(m.num_clips)))
    lin = lambda layer, v: layer.weight @ v + layer.bias
    total = 0.0
    step = m.clip_frames + m.gap
    for b in range(x.shape[0]):
        first = [int(offset[b]) + n * step for n in range(m.num_clips)]
        clips = [x[b, :, f : f + m.clip_frames] for f in first]
        shown = [clips[orders[int(labels[b])][k]] for k in range(m.num_clips)]
        f = [m.backbone(c[None])[0] for c in shown]
        pairs = [torch.relu(lin(m.head.pair_fc[0], torch.cat([f[i], f[j]])))
                 for i in range(m.num_clips) for j in range(i + 1, m.num_clips)]
        logits = lin(m.head.classifier[0], torch.cat(pairs))
        total = total - F.log_softmax(logits, 0)[int(labels[b])]
    return total / x.shape[0]


def test_loss_matches_a_naive_reference():
    m = method(dropout=0.0)
    x = torch.randn(5, 1, 9, 8, 8)  # 9 frames: offsets 0..1
    torch.manual_seed(3)
    loss, logs = m.training_step([x], PROGRESS)
    torch.manual_seed(3)  # the method's one draw: offset and order together, uniform over both
    r = torch.randint(6 * (9 - m.frames_needed + 1), (5,))
    offset, labels = r // 6, r % 6
    torch.testing.assert_close(loss, naive_loss(m, x, offset, labels))
    assert logs["z"].shape == (5, 6)


def test_gradients_reach_every_parameter_and_steps_lower_the_loss():
    x = torch.randn(8, 1, 8, 8, 8)
    gradients_reach_every_parameter(method(), [x])
    steps_lower_the_loss(method(), [x])


def test_with_the_default_video_backbone_when_present():
    from selfsup.nn.backbones import BACKBONES, build_backbone

    if "small_r3d" not in BACKBONES:
        pytest.skip("selfsup.nn.video has not registered small_r3d yet")
    m = VCOP(build_backbone("small_r3d", 1, 16, widths=[8, 16]), clip_frames=2, gap=1, pair_dim=8)
    gradients_reach_every_parameter(m, [torch.randn(4, 1, 8, 16, 16)])


def test_views_too_short_and_bad_settings_are_refused():
    m = VCOP(TinyClipNet())
    (problem,) = m.check_run(100, 8, ClipRecipe(clip_len=8, clips=1))
    assert "at least 16 frames" in problem and "views.clip_len" in problem
    with pytest.raises(ValueError, match="need views of 16 frames"):
        m.training_step([torch.randn(2, 1, 8, 8, 8)], PROGRESS)
    with pytest.raises(ValueError, match="num_clips"):
        VCOP(TinyClipNet(), num_clips=6)
    with pytest.raises(ValueError, match="gap"):
        VCOP(TinyClipNet(), gap=-1)
