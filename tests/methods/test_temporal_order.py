"""The shared parts of the temporal pretext tasks (selfsup.methods.temporal_order): permutation classes checked
exhaustively, motion measures and window sampling against loops, frame gathering, frame embeddings on both paths,
the pairwise order head against a naive loop, balanced labels and the kept-sample cross-entropy."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from temporal_stand_ins import TinyClipNet, TinyFrameNet, frame_time, time_coded

from selfsup.methods.temporal_order import (PairwiseOrderHead, apply_order, balanced_labels, check_frames,
                                            frame_embeddings, frame_motion, gather_frames, kept_cross_entropy,
                                            motion_energy, num_orders, order_permutations, permutation_index,
                                            reversal_classes, sample_motion_windows)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- orders and their classes ----

@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_order_permutations_are_every_order_once_in_lexicographic_order(n):
    perms = order_permutations(n)
    assert perms.shape == (math.factorial(n), n) and perms.dtype == torch.int64
    assert [tuple(p) for p in perms.tolist()] == list(itertools.permutations(range(n)))
    assert torch.equal(permutation_index(perms, perms), torch.arange(len(perms)))
    assert num_orders(n) == len(perms)
    with pytest.raises(ValueError, match="not permutations"):
        permutation_index(perms, torch.zeros(1, n, dtype=torch.int64))


@pytest.mark.parametrize("n", [3, 4, 5])
def test_reversal_classes_join_exactly_a_permutation_and_its_reverse(n):
    perms = [tuple(p) for p in order_permutations(n).tolist()]
    canonical, class_of = reversal_classes(n)
    assert len(canonical) == math.factorial(n) // 2 == num_orders(n, reversal_invariant=True)
    assert class_of.shape == (len(perms),) and set(class_of.tolist()) == set(range(len(canonical)))
    for i, p in enumerate(perms):  # exhaustive over every pair of permutations
        assert tuple(canonical[class_of[i]].tolist()) in (p, p[::-1])
        for j, q in enumerate(perms):
            assert (class_of[i] == class_of[j]) == (q == p or q == p[::-1]), (p, q)
    assert n != 4 or len(canonical) == 12


def test_apply_order_places_item_order_k_at_position_k():
    items = torch.arange(2 * 4 * 3).view(2, 4, 3)
    order = torch.tensor([[2, 0, 3, 1], [0, 1, 2, 3]])
    out = apply_order(items, order)
    for b in range(2):
        for k in range(4):
            assert torch.equal(out[b, k], items[b, order[b, k]])


def test_balanced_labels_have_the_exact_share_at_random_places():
    for b, frac in [(8, 0.5), (7, 0.5), (12, 0.25), (5, 0.0)]:
        flags = balanced_labels(b, frac)
        assert flags.dtype == torch.bool and int(flags.sum()) == round(frac * b)
    seen = torch.stack([balanced_labels(6, 0.5) for _ in range(100)])
    assert (seen.float().mean(0) > 0.2).all() and (seen.float().mean(0) < 0.8).all()  # every place both ways
    with pytest.raises(ValueError, match="share"):
        balanced_labels(4, 1.5)


# ---- motion ----

def test_motion_against_a_loop_and_zero_for_static_clips():
    x = torch.randn(3, 2, 5, 4, 4)
    x[1] = x[1, :, :1].expand(-1, 5, -1, -1)  # a static clip
    steps = frame_motion(x)
    for b in range(3):
        for t in range(4):
            assert steps[b, t].item() == pytest.approx((x[b, :, t + 1] - x[b, :, t]).abs().mean().item(), rel=1e-6)
    torch.testing.assert_close(motion_energy(x), steps.mean(dim=1))
    assert motion_energy(x)[1] == 0 and (motion_energy(x)[[0, 2]] > 0).all()
    assert torch.equal(motion_energy(x[:, :, :1]), torch.zeros(3))  # one frame: no motion
    torch.testing.assert_close(motion_energy(x.flip(2)), motion_energy(x))  # reversal keeps the energy


def test_motion_windows_are_drawn_only_where_things_move():
    t, span = 12, 4
    x = torch.zeros(2, 1, t, 6, 6)
    x[0, :, 5:9] = torch.rand(4, 6, 6)  # clip 0: frames 5–8 change, the rest static (steps 4..8 move)
    x[1] = torch.rand(1, 6, 6)  # clip 1: static throughout
    starts = torch.stack([sample_motion_windows(x, span)[0] for _ in range(400)])  # (400, 2)
    steps = frame_motion(x)
    naive = [[steps[b, s : s + span - 1].mean().item() for s in range(t - span + 1)] for b in range(2)]
    moving = {s for s, e in enumerate(naive[0]) if e > 0}
    assert set(starts[:, 0].tolist()) == moving  # every moving window drawn, no static one
    assert set(starts[:, 1].tolist()) == set(range(t - span + 1))  # static clip: uniform over every start
    s, motion = sample_motion_windows(x, span)
    assert motion[0].item() == pytest.approx(naive[0][int(s[0])], rel=1e-6) and motion[1] == 0
    # frequencies follow the windows' motion
    freq = torch.bincount(starts[:, 0], minlength=t - span + 1).float() / 400
    expected = torch.tensor(naive[0]) / sum(naive[0])
    assert (freq - expected).abs().max() < 0.1
    with pytest.raises(ValueError, match="does not fit"):
        sample_motion_windows(x, t + 1)


# ---- frames ----

def test_gather_frames_takes_the_named_frames():
    x = time_coded(3, 8)
    pos = torch.tensor([[0, 3, 7], [5, 5, 1], [2, 4, 6]])
    frames = gather_frames(x, pos)
    assert frames.shape == (3, 3, 1, 8, 8)
    for b in range(3):
        for k in range(3):
            assert torch.equal(frames[b, k], x[b, :, pos[b, k]])


def test_frame_embeddings_one_frame_clips_match_a_loop():
    net = TinyClipNet(2, 6)
    frames = torch.randn(3, 4, 2, 8, 8)
    out = frame_embeddings(net, frames)
    assert out.shape == (3, 4, 6)
    for b in range(3):
        for k in range(4):
            torch.testing.assert_close(out[b, k], net(frames[b, k][None, :, None])[0])


def test_frame_embeddings_use_frame_features_when_the_backbone_has_them():
    net = TinyFrameNet(1, 5)
    frames = torch.randn(2, 3, 1, 8, 8)
    out = frame_embeddings(net, frames)
    assert net.calls == 1 and out.shape == (2, 3, 5)
    for b in range(2):
        for k in range(3):
            expected = torch.relu(net.frame(frames[b, k][None])).mean(dim=(2, 3))[0]
            torch.testing.assert_close(out[b, k], expected)


def test_frame_embeddings_repeat_a_frame_for_networks_that_need_more_frames():
    class NeedsFour(TinyClipNet):
        min_frames = 4

        def forward(self, x):
            assert x.shape[2] == 4
            return super().forward(x)

    net = NeedsFour(1, 3)
    frames = torch.randn(2, 2, 1, 6, 6)
    out = frame_embeddings(net, frames)
    torch.testing.assert_close(out[1, 0], net(frames[1, 0][None, :, None].expand(-1, -1, 4, -1, -1))[0])


def test_frame_embeddings_of_a_real_per_frame_backbone_when_present():
    video = pytest.importorskip("selfsup.nn.video")
    if not hasattr(video, "PerFrame"):
        pytest.skip("selfsup.nn.video has no PerFrame yet")
    from selfsup.nn.backbones import build_backbone

    net = build_backbone("per_frame", 1, 16, frame_params={"widths": [8, 16]}).eval()
    frames = torch.randn(2, 3, 1, 16, 16)
    out = frame_embeddings(net, frames)
    torch.testing.assert_close(out[0, 2], net.frame(frames[0, 2][None])[0], rtol=1e-4, atol=1e-5)


# ---- the pairwise order head ----

@pytest.mark.parametrize("item_dim", [None, 5])
def test_pairwise_head_matches_a_naive_loop(item_dim):
    head = PairwiseOrderHead(4, 3, 6, pair_dim=7, item_dim=item_dim, dropout=0.0).double()
    feats = torch.randn(5, 3, 4, dtype=torch.float64)
    out = head(feats)
    lin = lambda layer, v: layer.weight @ v + layer.bias
    for b in range(5):
        items = [feats[b, k] if item_dim is None else torch.relu(lin(head.item_fc[0], feats[b, k])) for k in range(3)]
        pairs = [torch.relu(lin(head.pair_fc[0], torch.cat([items[i], items[j]])))
                 for i in range(3) for j in range(i + 1, 3)]
        torch.testing.assert_close(out[b], lin(head.classifier[0], torch.cat(pairs)))
    assert not torch.allclose(head(feats), head(feats[:, [1, 0, 2]]))  # order of items matters
    with pytest.raises(ValueError, match=r"\(B, 3, D\)"):
        head(feats[:, :2])


# ---- the loss over kept samples ----

def test_kept_cross_entropy_averages_over_kept_samples_only():
    logits = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    keep = torch.tensor([True, False, True, True, False, True])
    loss, acc = kept_cross_entropy(logits, labels, keep)
    naive = sum(-F.log_softmax(logits[i], 0)[labels[i]] for i in range(6) if keep[i]) / 4
    torch.testing.assert_close(loss, naive)
    assert acc.item() == pytest.approx(sum(int(logits[i].argmax() == labels[i]) for i in range(6) if keep[i]) / 4)
    none, acc0 = kept_cross_entropy(logits, labels, torch.zeros(6, dtype=torch.bool))
    assert none.item() == 0 and acc0.item() == 0
    none.backward()
    assert logits.grad is not None and logits.grad.abs().sum() == 0


def test_check_frames_says_what_to_change():
    assert check_frames("vcop", 16, 16, "x") == []
    (problem,) = check_frames("vcop", 8, 16, "raise views.clip_len")
    assert "at least 16 frames" in problem and "have 8" in problem and "views.clip_len" in problem


def test_time_coded_frames_read_back():
    x = time_coded(3, 6)
    assert [frame_time(x[2, :, t]) for t in range(6)] == list(range(6))
