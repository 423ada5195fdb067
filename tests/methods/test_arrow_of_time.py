"""Arrow of time (Wei et al. 2018): reversed clips are reversed in the tensors, exactly half a batch per step, static
clips leave the loss, the loss equals a naive per-sample reference, gradients and fitting on a fixed batch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from temporal_stand_ins import (PROGRESS, TinyClipNet, frame_time, gradients_reach_every_parameter,
                                steps_lower_the_loss, time_coded)

from selfsup.methods import METHODS
from selfsup.methods.arrow_of_time import ArrowOfTime, reverse_some
from selfsup.methods.temporal_order import balanced_labels
from selfsup.views.clips import ClipRecipe

pytestmark = pytest.mark.usefixtures("one_thread")


def method(**kw) -> ArrowOfTime:
    return ArrowOfTime(TinyClipNet(1, 8), head_hidden=8, **kw)


def with_static(x: torch.Tensor, static: list[int]) -> torch.Tensor:
    x = x.clone()
    for i in static:
        x[i] = x[i, :, :1].expand_as(x[i])
    return x


def test_registered_as_a_clip_pretext_method():
    info = METHODS["arrow_of_time"]
    assert info.cls is ArrowOfTime and info.family == "pretext" and "Wei" in info.paper
    spec = ArrowOfTime.spec
    assert spec.inputs == "clips" and isinstance(spec.views, ClipRecipe) and spec.views.clips == 1
    assert spec.default_backbone == "small_r3d" and spec.views.augment.flip_p == 0.5


def test_reverse_some_plays_exactly_the_flagged_clips_backwards():
    x = time_coded(4, 6)
    flags = torch.tensor([True, False, False, True])
    y = reverse_some(x, flags)
    for b in range(4):
        times = [frame_time(y[b, :, t]) for t in range(6)]
        assert times == (list(range(5, -1, -1)) if flags[b] else list(range(6)))
        assert all(frame_time(y[b, :, t]) + 100 * b == int(y[b, 0, t, 0, 0].floor()) for t in range(6))  # own clip


def test_training_step_reverses_half_the_batch_at_random():
    m = method(motion_threshold=0.0)
    seen = []
    m.backbone.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    x = time_coded(8, 5)
    flipped = []
    for _ in range(30):
        m.training_step([x], PROGRESS)
        inp = seen[-1]
        rev = [torch.equal(inp[b], x[b].flip(1)) for b in range(8)]
        assert all(r or torch.equal(inp[b], x[b]) for b, r in enumerate(rev))  # each clip forwards or backwards
        assert sum(rev) == 4
        flipped.append(rev)
    per_sample = torch.tensor(flipped).float().mean(0)
    assert (per_sample > 0.1).all() and (per_sample < 0.9).all()  # which half: random per sample and step


def naive_loss(m: ArrowOfTime, x: torch.Tensor, labels: torch.Tensor, threshold: float):
    """Per sample: motion by a loop over frame pairs, the clip reversed frame by frame, the backbone alone; the
    classifier on the stacked features (its batch norm sees the whole batch, as in the method); −log p(label) averaged
    over the clips that move."""
    b, _, t = x.shape[:3]
    feats, keep = [], []
    for i in range(b):
        energy = sum((x[i, :, s + 1] - x[i, :, s]).abs().mean() for s in range(t - 1)) / (t - 1)
        keep.append(bool(energy >= threshold))
        clip = torch.stack([x[i, :, t - 1 - s] for s in range(t)], dim=1) if labels[i] else x[i]
        feats.append(m.backbone(clip[None])[0])
    logits = m.classifier(torch.stack(feats))
    terms = [-F.log_softmax(logits[i], 0)[int(labels[i])] for i in range(b) if keep[i]]
    return sum(terms) / len(terms), sum(keep)


def test_loss_matches_a_naive_reference_and_drops_static_clips():
    x = with_static(torch.randn(8, 1, 6, 8, 8), [1, 4, 5])
    m = method(motion_threshold=0.01)
    torch.manual_seed(7)
    loss, logs = m.training_step([x], PROGRESS)
    torch.manual_seed(7)
    labels = balanced_labels(8, 0.5)  # the method's one random draw
    ref, kept = naive_loss(m, x, labels, 0.01)
    torch.testing.assert_close(loss, ref)
    assert kept == 5 and float(logs["kept"]) == 5


def test_an_all_static_batch_gives_zero_loss_and_zero_gradients():
    m = method()
    x = with_static(torch.randn(4, 1, 6, 8, 8), [0, 1, 2, 3])
    loss, logs = m.training_step([x], PROGRESS)
    assert loss.item() == 0 and float(logs["kept"]) == 0
    loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.parameters())


def test_gradients_reach_every_parameter_and_steps_lower_the_loss():
    x = torch.randn(8, 1, 6, 8, 8)
    gradients_reach_every_parameter(method(), [x])
    steps_lower_the_loss(method(), [x])


def test_with_the_default_video_backbone_when_present():
    from selfsup.nn.backbones import BACKBONES, build_backbone

    if "small_r3d" not in BACKBONES:
        pytest.skip("selfsup.nn.video has not registered small_r3d yet")
    m = ArrowOfTime(build_backbone("small_r3d", 1, 16, widths=[8, 16]), head_hidden=8)
    gradients_reach_every_parameter(m, [torch.randn(4, 1, 4, 16, 16)])


def test_bad_settings_are_refused():
    for kw, msg in [({"head_hidden": 0}, "head_hidden"), ({"motion_threshold": -1.0}, "motion_threshold"),
                    ({"reversed_fraction": 1.0}, "reversed_fraction")]:
        with pytest.raises(ValueError, match=msg):
            ArrowOfTime(TinyClipNet(), **kw)
    with pytest.raises(ValueError, match="T ≥ 2"):
        method().training_step([torch.randn(2, 1, 1, 8, 8)], PROGRESS)
