"""Handcrafted pretext tasks and PIRL: labels recoverable from their transforms, permutation sets,
the PIRL loss against a naive loop, the memory-bank update, colour guards, and errors before training.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_BACKBONES
from selfsup.config import ConfigError, load_config
from selfsup.data.sample_photos import sample_photo_crops
from selfsup.losses.pretext import pirl_loss
from selfsup.methods.base import Progress
from selfsup.methods.colorization import Colorization, merge_chroma, split_chroma
from selfsup.methods.jigsaw import Jigsaw
from selfsup.methods.pirl import PIRL
from selfsup.methods.relative_position import NEIGHBOURS, RelativePosition, drop_colours, neighbour_offset, patch_pairs
from selfsup.methods.rotation import rotate_all, rotate_some, unrotate
from selfsup.nn.backbones import build_backbone
from selfsup.views import Augment, ViewRecipe, resolve_sizes
from selfsup.views.tiles import (assemble_tiles, check_grid, cut_tiles, min_hamming, permutation_set, shuffle_tiles,
                                 unshuffle_tiles)


def backbone(in_chans: int = 1, size: int = 18):
    return build_backbone("small_resnet", in_chans, size, **TINY_BACKBONES["small_resnet"])


def images(b: int = 4, c: int = 1, s: int = 18) -> torch.Tensor:
    """Distinct pixel values, so any misplaced pixel or tile shows."""
    return torch.randperm(b * c * s * s).float().view(b, c, s, s)


# ---- every pretext label is recoverable from the transform that made it ----

def test_rotation_labels_undo_the_rotation():
    x = images()
    rotated, labels = rotate_all(x)
    assert rotated.shape == (16, 1, 18, 18) and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    torch.testing.assert_close(unrotate(rotated, labels), x.repeat(4, 1, 1, 1), rtol=0, atol=0)
    for k in (1, 2, 3):  # every other label would give a different image: the label is identifiable
        assert not torch.equal(unrotate(rotated[4 * k : 4 * k + 1], torch.tensor([0])), x[:1])


def test_some_rotations_per_image_are_distinct_and_undo_to_the_image():
    torch.manual_seed(0)
    x = images(6)
    for r in (1, 2, 3):
        rotated, labels = rotate_some(x, r)
        assert rotated.shape == (6 * r, 1, 18, 18) and labels.shape == (6 * r,)
        torch.testing.assert_close(unrotate(rotated, labels), x.repeat(r, 1, 1, 1), rtol=0, atol=0)
        per_image = labels.view(r, 6).T  # row i: the rotations drawn for image i
        assert all(len(set(row.tolist())) == r for row in per_image)
    rotated, labels = rotate_some(x, 4)  # all four: the paper's batch
    assert torch.equal(rotated, rotate_all(x)[0]) and torch.equal(labels, rotate_all(x)[1])
    seen = torch.stack([rotate_some(x, 1)[1] for _ in range(200)])  # each of the four is drawn for every image
    assert all(set(seen[:, i].tolist()) == {0, 1, 2, 3} for i in range(6))


def test_rotation_with_fewer_rotations_per_image_classifies_r_copies_and_refuses_bad_counts():
    from selfsup.methods.rotation import RotationPrediction

    torch.manual_seed(0)
    method = RotationPrediction(backbone(), head_hidden=8, rotations_per_image=2)
    seen = []
    method.classifier.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    loss, logs = method.training_step([torch.rand(5, 1, 18, 18)], Progress(0, 1, 0, 1))
    assert seen == [(10, 4)] and loss.isfinite() and 0 <= float(logs["pretext_acc"]) <= 1
    for bad in (0, 5):
        with pytest.raises(ValueError, match="rotations_per_image must be 1–4"):
            RotationPrediction(backbone(), rotations_per_image=bad)


def test_tiles_reassemble_and_sit_at_their_offsets():
    x = images(3, 2, 18)
    tiles, offsets = cut_tiles(x, 3, 0)
    assert tiles.shape == (3, 9, 2, 6, 6) and offsets.abs().sum() == 0
    torch.testing.assert_close(assemble_tiles(tiles, 3), x, rtol=0, atol=0)
    tiles, offsets = cut_tiles(x, 3, 2)  # 6 px cells, 4 px tiles, jitter 0..2
    assert tiles.shape == (3, 9, 2, 4, 4) and offsets.min() >= 0 and offsets.max() <= 2
    for b in range(3):  # naive reference: slice each tile out of its cell at its recorded offset
        for i in range(9):
            top, left = (i // 3) * 6 + int(offsets[b, i, 0]), (i % 3) * 6 + int(offsets[b, i, 1])
            assert torch.equal(tiles[b, i], x[b, :, top : top + 4, left : left + 4])


def test_jigsaw_label_unshuffles_the_puzzle():
    torch.manual_seed(3)
    jig = Jigsaw(backbone(), gap=0, num_permutations=10)
    x = images(6)
    shuffled, labels = jig.puzzles(x)
    perms = jig.perms[labels]
    torch.testing.assert_close(assemble_tiles(unshuffle_tiles(shuffled, perms), 3), x, rtol=0, atol=0)
    for b in range(6):  # only the labelled permutation of the set restores the image
        restores = [torch.equal(assemble_tiles(unshuffle_tiles(shuffled[b : b + 1], p[None]), 3), x[b : b + 1])
                    for p in jig.perms]
        assert restores == [k == int(labels[b]) for k in range(len(jig.perms))]


def test_relative_position_label_points_at_the_neighbour():
    x = images(16, 1, 18)
    tiles, _ = cut_tiles(x, 3, 0)
    centre, neighbour, labels = patch_pairs(tiles)
    assert set(labels.tolist()) <= set(range(8))
    for b in range(16):
        dy, dx = neighbour_offset(int(labels[b]))
        assert (dy, dx) != (0, 0)
        top, left = (1 + dy) * 6, (1 + dx) * 6
        assert torch.equal(neighbour[b], x[b, :, top : top + 6, left : left + 6])
        assert torch.equal(centre[b], x[b, :, 6:12, 6:12])
    assert len({neighbour_offset(k) for k in range(len(NEIGHBOURS))}) == 8


def test_colorization_split_is_exactly_invertible_and_grey_has_no_chroma():
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    y, uv = split_chroma(x)
    assert y.shape == (3, 1, 8, 8) and uv.shape == (3, 2, 8, 8)
    torch.testing.assert_close(merge_chroma(y, uv), x)
    grey = x[:, :1].expand(-1, 3, -1, -1)
    y_g, uv_g = split_chroma(grey)
    torch.testing.assert_close(uv_g, torch.zeros_like(uv_g))
    torch.testing.assert_close(y_g, x[:, :1])


def test_pirl_jigsaw_branch_only_reorders_tile_features():
    """g sees the nine tile embeddings in a random order: shuffling them back gives the ordered concatenation."""
    h = torch.randn(5, 9, 3)
    order = torch.rand(5, 9).argsort(dim=1)
    torch.testing.assert_close(unshuffle_tiles(shuffle_tiles(h, order), order), h)


# ---- permutation sets ----

@pytest.mark.parametrize("size,tiles,stated", [(100, 9, 6), (30, 9, 7), (24, 4, 2), (10, 9, 8)])
def test_permutation_sets_are_unique_far_apart_and_deterministic(size, tiles, stated):
    """Minimum distances stated in selfsup.views.tiles (max-min greedy selection)."""
    p = permutation_set(size, tiles, seed=0)
    assert p.shape == (size, tiles) and p.dtype == torch.int64
    assert len({tuple(r) for r in p.tolist()}) == size
    assert all(sorted(r) == list(range(tiles)) for r in p.tolist())
    assert min_hamming(p) >= stated
    assert torch.equal(p, permutation_set(size, tiles, seed=0))
    if size < math.factorial(tiles):
        assert not torch.equal(p, permutation_set(size, tiles, seed=1))


def test_min_hamming_against_a_loop():
    p = torch.stack([torch.randperm(6) for _ in range(12)])
    naive = min(sum(int(a != b) for a, b in zip(p[i], p[j])) for i in range(12) for j in range(i + 1, 12))
    assert min_hamming(p) == naive


def test_permutation_set_larger_than_all_permutations_is_refused():
    with pytest.raises(ValueError, match="24 permutations"):
        permutation_set(25, tiles=4)
    with pytest.raises(ValueError, match="362880 permutations"):
        Jigsaw(backbone(), num_permutations=362881)
    with pytest.raises(ValueError, match="grid must be 2 or 3"):
        Jigsaw(backbone(), grid=4)


# ---- the PIRL loss ----

def naive_pirl(f, g, m, neg, tau, lam):
    """Paper eq. 5 with the InfoNCE contrast, one image at a time: −log e^{s(m,q)/τ} / (e^{s(m,q)/τ} + Σ_n e^{s(n,q)/τ})."""
    cos = lambda a, b: torch.dot(a, b) / (a.norm() * b.norm())  # noqa: E731

    def nce(q, pos):
        num = torch.exp(cos(q, pos) / tau)
        return -torch.log(num / (num + sum(torch.exp(cos(q, n) / tau) for n in neg)))

    return sum(lam * nce(g[i], m[i]) + (1 - lam) * nce(f[i], m[i]) for i in range(len(f))) / len(f)


@pytest.mark.parametrize("b,k,d,tau,lam", [(3, 5, 4, 0.07, 0.5), (4, 7, 8, 0.5, 0.25), (2, 3, 3, 1.0, 1.0)])
def test_pirl_loss_matches_naive(b, k, d, tau, lam):
    f, g, m, neg = (torch.randn(n, d, dtype=torch.float64) for n in (b, b, b, k))
    torch.testing.assert_close(pirl_loss(f, g, m, neg, tau, lam), naive_pirl(f, g, m, neg, tau, lam))


def test_pirl_loss_analytic_and_invariant():
    tau, k = 0.1, 4
    m = torch.eye(6, dtype=torch.float64)[:2]
    neg = torch.eye(6, dtype=torch.float64)[2:]  # orthogonal to every positive
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + k))
    assert pirl_loss(m.clone(), m.clone(), m, neg, tau).item() == pytest.approx(expected, rel=1e-12)
    f, g, mm, nn_ = (torch.randn(n, 5, dtype=torch.float64) for n in (3, 3, 3, 6))
    base = pirl_loss(f, g, mm, nn_, 0.2, 0.3)
    torch.testing.assert_close(pirl_loss(2 * f, 0.5 * g, 3 * mm, 4 * nn_, 0.2, 0.3), base)  # cosine: scale-free
    torch.testing.assert_close(pirl_loss(f, g, mm, nn_[torch.randperm(6)], 0.2, 0.3), base)  # negatives are a set
    only_g = pirl_loss(f, g, mm, nn_, 0.2, 1.0)
    only_f = pirl_loss(f, g, mm, nn_, 0.2, 0.0)
    torch.testing.assert_close(base, 0.3 * only_g + 0.7 * only_f)
    with pytest.raises(ValueError, match="λ"):
        pirl_loss(f, g, mm, nn_, 0.2, 1.5)


def test_pirl_loss_gradcheck_and_no_gradient_into_memory():
    f = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    m = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    neg = torch.randn(5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: pirl_loss(a, b, m, neg, 0.2), (f, g))
    pirl_loss(f, g, m, neg, 0.2).backward()
    assert m.grad is None


# ---- methods ----

def test_pirl_memory_bank_follows_its_update_rule():
    torch.manual_seed(0)
    method = PIRL(backbone(), gap=1, num_negatives=8)
    x = torch.randn(4, 1, 18, 18)
    idx = torch.tensor([7, 2, 9, 4])
    method.training_step([x, x], Progress(0, 10, 0, 5), indices=idx)
    assert len(method.bank) == 10 and method.bank.filled_indices().tolist() == [2, 4, 7, 9]
    old = method.bank.read(idx)
    method.eval()  # BN in eval so f(v_I) can be recomputed exactly
    torch.manual_seed(1)
    _, logs = method.training_step([x, x], Progress(1, 10, 0, 5), indices=idx)
    f = F.normalize(method.f(method.backbone(x)), dim=1)
    torch.testing.assert_close(method.bank.read(idx), F.normalize(0.5 * old + 0.5 * f, dim=1))
    assert float(logs["new_rows"]) == 0.0
    state = method.state_dict()
    fresh = PIRL(backbone(), gap=1, num_negatives=8)
    fresh.load_state_dict(state)  # the bank grows to the checkpoint's size (resume)
    torch.testing.assert_close(fresh.bank.rows, method.bank.rows)
    assert torch.equal(fresh.bank.filled, method.bank.filled)


def test_classifiers_log_pretext_accuracy():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 18, 18)
    for method in (Jigsaw(backbone(), gap=1, num_permutations=10), RelativePosition(backbone(), gap=1)):
        loss, logs = method.training_step([x], Progress(0, 10, 0, 5))
        acc = logs["pretext_acc"]
        assert torch.isfinite(loss) and acc.ndim == 0 and 0 <= float(acc) <= 1 and not acc.requires_grad


def test_colour_dropping_keeps_one_channel_per_patch():
    torch.manual_seed(0)
    p = torch.randn(32, 3, 5, 5)
    out = drop_colours(p)
    kept = (out == p).flatten(2).all(dim=2)  # (N, C): channel left untouched
    assert kept.sum(dim=1).tolist() == [1] * 32
    dropped = out[~kept]
    assert dropped.abs().max() < 0.1 * p.abs().max()  # noise of 1/100 of the kept channel's std
    grey = torch.randn(4, 1, 5, 5)
    assert torch.equal(drop_colours(grey), grey)


def test_colorization_learns_on_rgb_photos():
    torch.manual_seed(0)
    data = sample_photo_crops(16, 16, seed=0)
    method = Colorization(backbone(3, 16), out_size=4, hidden=32)
    x = (data.images.float() / 255 - 0.5) / 0.25
    loss, logs = method.training_step([x], Progress(0, 10, 0, 5))
    assert torch.isfinite(loss) and logs["z"].shape == (16, 32)
    assert float(logs["chroma_mse"]) == pytest.approx(float(loss.detach()))


# ---- bad input: clear errors before training ----

def test_grid_that_does_not_fit_is_reported():
    assert "does not fit a 8×8 view" in check_grid(8, 3, 1)[0]
    with pytest.raises(ValueError, match="does not fit"):
        cut_tiles(torch.zeros(1, 1, 8, 8), 3, 1)
    recipe = ViewRecipe(globals_=(Augment(size=8),))
    for method in (Jigsaw(backbone(), num_permutations=10), RelativePosition(backbone())):
        problems = method.check_run(100, 16, recipe)
        assert problems and "3×3 grid does not fit a 8×8 view" in problems[0]


def test_colorization_refuses_single_channel_data():
    with pytest.raises(ValueError, match=r"needs colour images \(3 channels\); the data has 1 channel"):
        Colorization(backbone(1))


@pytest.mark.parametrize("method,message", [("jigsaw", "grid does not fit"), ("relative_position", "grid does not fit"),
                                            ("colorization", "needs colour images")])
def test_pretrain_stops_before_training(method, message, tmp_path):
    """Through the real entry point on 8×8 one-channel digits: a config error, and no checkpoint written."""
    from selfsup.train.loop import pretrain

    cfg = load_config(None, {"method.name": method, "data.name": "digits", "train.epochs": 1,
                             "train.batch_size": 64, "train.threads": 1, "train.progress": False,
                             "backbone.params": {"widths": [8, 16]}})
    with pytest.raises(ConfigError, match=message):
        pretrain(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


# ---- the RGB demo data and its picture ----

def test_sample_photo_crops_are_rgb_and_reproducible():
    a = sample_photo_crops(20, 24, seed=1)
    assert a.images.shape == (20, 3, 24, 24) and a.images.dtype == torch.uint8 and a.classes == ["china", "flower"]
    assert set(a.labels.tolist()) <= {0, 1}
    assert torch.equal(a.images, sample_photo_crops(20, 24, seed=1).images)
    assert not torch.equal(a.images, sample_photo_crops(20, 24, seed=2).images)
    gray = a.images.float().std(dim=1).mean()  # the channels differ: there is colour to predict
    assert gray > 1.0


def test_colorization_grid_png(tmp_path):
    from selfsup.report.colorization import save_colorization_grid

    data = sample_photo_crops(6, 16, seed=0)
    method = Colorization(backbone(3, 16), out_size=4, hidden=32)
    path = save_colorization_grid(method, data.images, [0.5] * 3, [0.25] * 3, tmp_path / "grid.png")
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="RGB"):
        save_colorization_grid(method, data.images[:, :1], [0.5], [0.25], tmp_path / "bad.png")


# ---- held-out pretext accuracy (the bench's pretext column) ----

class _BrightIsRight(torch.nn.Module):
    """A stand-in pretext method that 'solves' exactly the bright images of a batch."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(1)

    def training_step(self, views, progress):
        assert not self.training and not torch.is_grad_enabled()
        return torch.zeros(()), {"pretext_acc": (views[0].mean(dim=(1, 2, 3)) > 0).float().mean()}


def test_pretext_accuracy_weights_every_image_once_and_restores_state():
    from selfsup.data import ImageSet
    from selfsup.eval.pretext import pretext_accuracy

    pixels = torch.zeros(7, 1, 6, 6, dtype=torch.uint8)
    pixels[:3] = 255  # 3 of 7 bright, batches of 4 and 3: a per-batch mean of means would give 3/8
    method = _BrightIsRight().train()
    recipe = ViewRecipe(globals_=(Augment.identity(6),))
    before = torch.random.get_rng_state()
    acc = pretext_accuracy(method, ImageSet(pixels), recipe, [0.5], [0.5], batch_size=4)
    assert acc == pytest.approx(3 / 7) and method.training
    assert torch.equal(torch.random.get_rng_state(), before)  # its fixed seed leaves the caller's stream alone


def test_pretext_accuracy_of_a_trained_rotation_model_is_repeatable_and_none_for_simclr():
    from selfsup.data import ImageSet
    from selfsup.eval.pretext import pretext_accuracy
    from selfsup.methods import get_method

    torch.manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (10, 1, 18, 18), dtype=torch.uint8))
    rot = get_method("rotation").cls(backbone())
    recipe = resolve_sizes(rot.spec.views, 18)
    first = pretext_accuracy(rot, data, recipe, [0.5], [0.25], seed=3)
    assert 0.0 <= first <= 1.0 and first == pretext_accuracy(rot, data, recipe, [0.5], [0.25], seed=3)
    simclr = get_method("simclr").cls(backbone(), **get_method("simclr").spec.test_params)
    assert pretext_accuracy(simclr, data, resolve_sizes(simclr.spec.views, 18), [0.5], [0.25]) is None
