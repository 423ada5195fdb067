"""DenseCL and VICRegL losses and matching (selfsup.losses.dense): against naive loops written from the papers and
against transcriptions of the reference code (WXinlong/DenseCL ``densecl.py``, facebookresearch/VICRegL
``main_vicregl.py``), hand-made matching cases, crop boxes against the pixels they crop (flips included),
analytic cases, float64 gradcheck, and the redundancy terms generalised to stacks of batches."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.losses.dense import (densecl_dense_loss, flatten_map, grid_locations, l2_matches, local_vicreg_terms,
                                  location_matches, match_by_cosine, nearest_matches, take_locations,
                                  vicregl_global_loss, vicregl_local_loss)
from selfsup.losses.redundancy import _off_diagonal, covariance_loss, variance_loss, vicreg_loss
from selfsup.views import Augment, ViewRecipe, make_views

f64 = dict(dtype=torch.float64)


def test_flatten_map_is_row_major_and_take_locations_picks_rows():
    m = torch.arange(2 * 3 * 2 * 4, **f64).view(2, 3, 2, 4)  # (B, C, H, W)
    flat = flatten_map(m)
    assert flat.shape == (2, 8, 3)
    for b in range(2):
        for i in range(2):
            for j in range(4):
                assert torch.equal(flat[b, i * 4 + j], m[b, :, i, j])
    idx = torch.tensor([[7, 0], [3, 3]])
    got = take_locations(flat, idx)
    assert torch.equal(got[0, 0], flat[0, 7]) and torch.equal(got[1, 1], flat[1, 3])


# --- DenseCL ----------------------------------------------------------------------------------------

def test_match_by_cosine_finds_a_permutation_and_ignores_scale():
    """Key locations are the query's, permuted and each rescaled: cosine matching recovers the permutation."""
    q = torch.randn(3, 6, 5, **f64)
    perm = torch.stack([torch.randperm(6) for _ in range(3)])  # key location perm[b, n] holds query location n
    k = torch.empty_like(q)
    for b in range(3):
        k[b, perm[b]] = q[b] * torch.rand(6, 1, **f64).add(0.5)
    assert torch.equal(match_by_cosine(q, k), perm)


def test_match_by_cosine_matches_naive():
    q, k = torch.randn(2, 5, 4, **f64), torch.randn(2, 7, 4, **f64)
    got = match_by_cosine(q, k)
    for b in range(2):
        for n in range(5):
            sims = [float(torch.dot(q[b, n], k[b, m]) / (q[b, n].norm() * k[b, m].norm())) for m in range(7)]
            assert got[b, n] == max(range(7), key=sims.__getitem__)


def naive_dense_info_nce(q, pos, tau, negatives, own_rows=None):
    """arXiv:2011.09157 eq. 2 per location, averaged over the B·N locations, with explicit sums."""
    b_, n_, _ = q.shape
    total = q.new_zeros(())
    for b in range(b_):
        negs = [negatives[r] for r in range(negatives.shape[0]) if own_rows is None or r != own_rows[b]]
        for n in range(n_):
            r = q[b, n] / q[b, n].norm()
            t = pos[b, n] / pos[b, n].norm()
            num = torch.exp(torch.dot(r, t) / tau)
            den = num + sum(torch.exp(torch.dot(r, v / v.norm()) / tau) for v in negs)
            total = total - torch.log(num / den)
    return total / (b_ * n_)


@pytest.mark.parametrize("b,n,d,k,tau", [(2, 4, 3, 5, 0.2), (3, 9, 6, 1, 0.5), (1, 2, 4, 8, 1.0)])
def test_densecl_dense_loss_matches_naive(b, n, d, k, tau):
    q, pos, neg = torch.randn(b, n, d, **f64), torch.randn(b, n, d, **f64), torch.randn(k, d, **f64)
    torch.testing.assert_close(densecl_dense_loss(q, pos, tau, neg), naive_dense_info_nce(q, pos, tau, neg))


def test_densecl_in_batch_form_leaves_each_images_own_row_out():
    q, pos, pooled = torch.randn(4, 3, 5, **f64), torch.randn(4, 3, 5, **f64), torch.randn(6, 5, **f64)
    own = [2, 3, 4, 5]  # e.g. the second process's rows of a gathered batch of 6
    torch.testing.assert_close(densecl_dense_loss(q, pos, 0.2, pooled, own_rows=range(2, 6)),
                               naive_dense_info_nce(q, pos, 0.2, pooled, own))
    with pytest.raises(ValueError, match="own_rows"):
        densecl_dense_loss(q, pos, 0.2, pooled, own_rows=range(3))


def test_densecl_matches_a_transcription_of_the_reference():
    """densecl.py ``forward_train``'s dense part on the same tensors: backbone-feature similarity, argmax, gathered
    positives, ``l_pos_dense``/``l_neg_dense`` against queue2, ContrastiveHead's cross-entropy."""
    b, c, d, s2, k, tau = 3, 6, 4, 9, 7, 0.2
    q_b, k_b = torch.randn(b, c, s2, **f64), torch.randn(b, c, s2, **f64)  # reference layout: N×C×S²
    q_grid, k_grid = torch.randn(b, d, s2, **f64), torch.randn(b, d, s2, **f64)
    queue2 = F.normalize(torch.randn(d, k, **f64), dim=0)
    # the reference, line by line
    nq_grid, nk_grid = F.normalize(q_grid, dim=1), F.normalize(k_grid, dim=1)
    sim = torch.matmul(F.normalize(q_b, dim=1).permute(0, 2, 1), F.normalize(k_b, dim=1))
    ind = sim.max(dim=2)[1]
    indexed_k_grid = torch.gather(nk_grid, 2, ind.unsqueeze(1).expand(-1, nk_grid.size(1), -1))
    l_pos = (nq_grid * indexed_k_grid).sum(1).view(-1).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", [nq_grid.permute(0, 2, 1).reshape(-1, d), queue2])
    logits = torch.cat((l_pos, l_neg), dim=1) / tau
    ref = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))
    # ours, on (B, S², C) layouts
    match = match_by_cosine(q_b.transpose(1, 2), k_b.transpose(1, 2))
    assert torch.equal(match, ind)
    got = densecl_dense_loss(q_grid.transpose(1, 2), take_locations(k_grid.transpose(1, 2), match), tau, queue2.T)
    torch.testing.assert_close(got, ref)


def test_densecl_identical_views_analytic():
    """Identical views: the correspondence is the identity, every positive has cos 1; with K negatives orthogonal to
    every query the loss is log(1 + K e^{−1/τ})."""
    tau, k = 0.2, 3
    feats = torch.randn(2, 5, 8, **f64)
    match = match_by_cosine(feats, feats.clone())
    assert torch.equal(match, torch.arange(5).expand(2, 5))
    dense = torch.zeros(2, 5, 8, **f64)
    dense[..., :5] = torch.rand(2, 5, 5, **f64) + 0.1  # queries in the first 5 dims, negatives in the last 3
    negatives = torch.eye(8, **f64)[5:]
    loss = densecl_dense_loss(dense, take_locations(dense, match), tau, negatives)
    assert loss.item() == pytest.approx(math.log(1 + k * math.exp(-1 / tau)))


def test_densecl_dense_loss_gradcheck():
    q = torch.randn(2, 3, 4, **f64, requires_grad=True)
    pos = torch.randn(2, 3, 4, **f64, requires_grad=True)
    neg = torch.randn(5, 4, **f64)
    assert torch.autograd.gradcheck(lambda a, p: densecl_dense_loss(a, p, 0.3, neg), (q, pos))
    assert torch.autograd.gradcheck(lambda a, p: densecl_dense_loss(a, p, 0.3, neg, own_rows=[1, 4]), (q, pos))


# --- VICRegL: locations and matching ----------------------------------------------------------------

def test_grid_locations_hand_made():
    box = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.3, 0.6, -0.4, 0.2]], **f64)  # the second mirrored
    got = grid_locations(box, 2, 2)
    torch.testing.assert_close(got[0], torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]], **f64))
    # mirrored: column 0 of the view lies at the box's right edge
    x = [0.3 + 0.1, 0.3 - 0.1]
    y = [0.6 - 0.05, 0.6 + 0.05]
    torch.testing.assert_close(got[1], torch.tensor([[x[0], y[0]], [x[1], y[0]], [x[0], y[1]], [x[1], y[1]]], **f64))


def _ramp_views(flip_p: float, size: int = 16, n: int = 6):
    """Views of a 64-px image whose pixel value is its column (x) in the red channel and row (y) in the green:
    geometry only (no colour augmentation), unnormalised."""
    side = 64
    xs = torch.arange(side, **f64)
    img = torch.zeros(n, 3, side, side)
    img[:, 0] = (xs * 4)[None, None, :].float()
    img[:, 1] = (xs * 4)[None, :, None].float()
    recipe = ViewRecipe(globals_=(Augment(size=size, scale=(0.3, 0.6), flip_p=flip_p, jitter_p=0, gray_p=0, blur_p=0),))
    torch.manual_seed(0)
    (view,), (box,) = make_views(img.to(torch.uint8), recipe, [0.0] * 3, [1 / 255] * 3, with_boxes=True)
    return view, box


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_grid_locations_are_where_the_view_pixels_come_from(flip_p):
    """Each view pixel is a 1×1 map cell: its location, in image-height units, times the image side is the
    pixel's column (red) and row (green) in the image, so boxes and grids agree, mirrored views included."""
    view, box = _ramp_views(flip_p)
    assert bool((box[:, 2] < 0).all()) == (flip_p == 1.0)
    loc = grid_locations(box.double(), 16, 16) * 64 - 0.5  # image pixel coordinates of the cell centres
    col = flatten_map(view.double())[..., 0] / 4
    row = flatten_map(view.double())[..., 1] / 4
    inner = (loc.min(-1).values > 1) & (loc.max(-1).values < 62)  # away from the reflected border
    assert inner.float().mean() > 0.9
    torch.testing.assert_close(col[inner], loc[..., 0][inner], atol=0.02, rtol=0)
    torch.testing.assert_close(row[inner], loc[..., 1][inner], atol=0.02, rtol=0)


def test_a_mirrored_view_matches_the_mirrored_cells():
    """The same crop, unflipped and flipped (the same draws): location matching pairs cell (i, j) with (i, W − 1 − j)
    at distance 0, as the reference's ``--no-flip-grid 1`` would not."""
    _, plain = _ramp_views(0.0)
    _, mirrored = _ramp_views(1.0)
    torch.testing.assert_close(mirrored[:, 2], -plain[:, 2])
    h = w = 4
    a, b = grid_locations(plain, h, w), grid_locations(mirrored, h, w)
    source, target = nearest_matches(torch.cdist(a, b))
    expected = torch.tensor([i * w + (w - 1 - j) for i in range(h) for j in range(w)])
    assert torch.equal(source, torch.arange(h * w).expand_as(source)) and torch.equal(target, expected.expand_as(target))
    maps = torch.randn(plain.shape[0], h * w, 3)
    x, y = location_matches(maps, maps, a, b, num_matches=h * w)
    assert torch.equal(y, maps[:, expected])


def test_nearest_matches_hand_made():
    d = torch.tensor([[[5.0, 1.0, 9.0],    # source 0 → 1 (1.0)
                       [0.5, 7.0, 3.0],    # source 1 → 0 (0.5)
                       [4.0, 8.0, 2.0],    # source 2 → 2 (2.0)
                       [6.0, 0.1, 6.0]]])  # source 3 → 1 (0.1)
    src, tgt = nearest_matches(d)
    assert src.tolist() == [[0, 1, 2, 3]] and tgt.tolist() == [[1, 0, 2, 1]]
    src, tgt = nearest_matches(d, num_matches=2)  # the two closest pairs: sources 3 (0.1) and 1 (0.5), source order
    assert src.tolist() == [[1, 3]] and tgt.tolist() == [[0, 1]]
    src, tgt = nearest_matches(d, num_matches=3)
    assert src.tolist() == [[0, 1, 3]] and tgt.tolist() == [[1, 0, 1]]
    with pytest.raises(ValueError, match="num_matches=5"):
        nearest_matches(d, num_matches=5)


def reference_neirest_neighbores(input_maps, candidate_maps, distances, num_matches):
    """main_vicregl.py ``neirest_neighbores`` (with ``batched_index_select``), transcribed."""
    batch_size = input_maps.size(0)
    if num_matches is None or num_matches == -1:
        num_matches = input_maps.size(1)
    topk_values, topk_indices = distances.topk(k=1, largest=False)
    topk_values, topk_indices = topk_values.squeeze(-1), topk_indices.squeeze(-1)
    _, sorted_values_indices = torch.sort(topk_values, dim=1)
    _, sorted_indices_indices = torch.sort(sorted_values_indices, dim=1)
    mask = torch.stack([torch.where(sorted_indices_indices[i] < num_matches, True, False) for i in range(batch_size)])
    topk_indices_selected = topk_indices.masked_select(mask).reshape(batch_size, num_matches)
    indices = torch.arange(0, topk_values.size(1)).unsqueeze(0).repeat(batch_size, 1)
    indices_selected = indices.masked_select(mask).reshape(batch_size, num_matches)

    def select(x, index):
        return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    return select(input_maps, indices_selected), select(candidate_maps, topk_indices_selected)


@pytest.mark.parametrize("num_matches", [None, 1, 4, 9])
def test_matching_equals_the_reference(num_matches):
    a, b = torch.randn(3, 9, 5, **f64), torch.randn(3, 7, 5, **f64)
    la, lb = torch.rand(3, 9, 2, **f64), torch.rand(3, 7, 2, **f64)
    for got, ref in ((l2_matches(a, b, num_matches), reference_neirest_neighbores(a, b, torch.cdist(a, b), num_matches)),
                     (location_matches(a, b, la, lb, num_matches),
                      reference_neirest_neighbores(a, b, torch.cdist(la, lb), num_matches))):
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_l2_matches_hand_made():
    """Map b is map a's locations in reverse order plus a little noise: every location finds its mirror image."""
    a = torch.tensor([[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]])
    b = a.flip(1) + 0.1
    x, y = l2_matches(a, b)
    assert torch.equal(x, a) and torch.equal(y, a + 0.1)


# --- VICRegL: losses --------------------------------------------------------------------------------

def naive_slot_terms(x, y, gamma=1.0, eps=1e-4):
    """The reference's ``_vicreg_loss`` (unweighted) with explicit sums: MSE over all entries; for each match slot
    k, the hinge on each channel's unbiased std over the batch and c(·) of the slot's (C, C) covariance; each
    averaged over slots and over the two sides."""
    b_, k_, c_ = x.shape
    inv = sum((x[b, k, c] - y[b, k, c]) ** 2 for b in range(b_) for k in range(k_) for c in range(c_)) / x.numel()

    def v_and_c(z):
        v = c_tot = z.new_zeros(())
        for k in range(k_):
            means = [sum(z[b, k, c] for b in range(b_)) / b_ for c in range(c_)]
            for c in range(c_):
                var = sum((z[b, k, c] - means[c]) ** 2 for b in range(b_)) / (b_ - 1)
                v = v + torch.clamp(gamma - torch.sqrt(var + eps), min=0) / c_
                for e in range(c_):
                    if e != c:
                        cov = sum((z[b, k, c] - means[c]) * (z[b, k, e] - means[e]) for b in range(b_)) / (b_ - 1)
                        c_tot = c_tot + cov ** 2 / c_
        return v / k_, c_tot / k_

    (vx, cx), (vy, cy) = v_and_c(x), v_and_c(y)
    return inv, (vx + vy) / 2, (cx + cy) / 2


def reference_vicreg_loss(x, y, inv_coeff=25.0, var_coeff=25.0, cov_coeff=1.0):
    """main_vicregl.py ``_vicreg_loss`` transcribed (one process: ``gather_center`` only centres)."""
    repr_loss = inv_coeff * F.mse_loss(x, y)
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    std_x, std_y = torch.sqrt(x.var(dim=0) + 0.0001), torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = var_coeff * (torch.mean(F.relu(1.0 - std_x)) / 2 + torch.mean(F.relu(1.0 - std_y)) / 2)
    x, y = x.permute((1, 0, 2)), y.permute((1, 0, 2))
    *_, sample_size, num_channels = x.shape
    non_diag_mask = ~torch.eye(num_channels, dtype=torch.bool)
    x, y = x - x.mean(dim=-2, keepdim=True), y - y.mean(dim=-2, keepdim=True)
    cov_x = torch.einsum("...nc,...nd->...cd", x, x) / (sample_size - 1)
    cov_y = torch.einsum("...nc,...nd->...cd", y, y) / (sample_size - 1)
    cov_loss = (cov_x[..., non_diag_mask].pow(2).sum(-1) / num_channels) / 2 + (
        cov_y[..., non_diag_mask].pow(2).sum(-1) / num_channels) / 2
    return repr_loss, std_loss, cov_coeff * cov_loss.mean()


@pytest.mark.parametrize("b,k,c", [(4, 3, 3), (6, 1, 2), (3, 5, 4)])
def test_local_vicreg_terms_match_naive_and_the_reference(b, k, c):
    x, y = 0.6 * torch.randn(b, k, c, **f64), torch.randn(b, k, c, **f64) + 0.3
    got = local_vicreg_terms(x, y)
    for g, n in zip(got, naive_slot_terms(x, y)):
        torch.testing.assert_close(g, n)
    for g, r, w in zip(got, reference_vicreg_loss(x, y), (25.0, 25.0, 1.0)):
        torch.testing.assert_close(w * g, r)


def reference_local_loss(maps, locations, num_matches, l2_all_matches=True, coeffs=(25.0, 25.0, 1.0)):
    """main_vicregl.py ``_local_loss`` and ``local_loss`` (without fast_vc_reg) transcribed on the functions above."""
    def pair(m1, m2, l1, l2):
        inv = var = cov = 0.0
        counts = [None, None] if l2_all_matches else num_matches
        for (a, b), (c, d) in (
                (reference_neirest_neighbores(m1, m2, torch.cdist(m1, m2), counts[0]),
                 reference_neirest_neighbores(m2, m1, torch.cdist(m2, m1), counts[1])),
                (reference_neirest_neighbores(m1, m2, torch.cdist(l1, l2), num_matches[0]),
                 reference_neirest_neighbores(m2, m1, torch.cdist(l2, l1), num_matches[1]))):
            i1, v1, c1 = reference_vicreg_loss(a, b, *coeffs)
            i2, v2, c2 = reference_vicreg_loss(c, d, *coeffs)
            inv, var, cov = inv + (i1 / 2 + i2 / 2), var + (v1 / 2 + v2 / 2), cov + (c1 / 2 + c2 / 2)
        return inv, var, cov

    inv = var = cov = 0.0
    it = 0
    for i in range(2):
        for j in [j for j in range(len(maps)) if j != i]:
            a, b, c = pair(maps[i], maps[j], locations[i], locations[j])
            inv, var, cov, it = inv + a, var + b, cov + c, it + 1
    return (inv + var + cov) / it


def _random_views(sides, b=5, c=4):
    g = torch.Generator().manual_seed(sum(sides))
    maps = [torch.randn(b, s * s, c, generator=g, **f64) for s in sides]
    boxes = [torch.cat([torch.rand(b, 2, generator=g, **f64), (torch.rand(b, 2, generator=g, **f64) + 0.3)
                        * torch.tensor([-1.0, 1.0], **f64)], 1) for _ in sides]  # some flipped, all > 0 high
    return maps, [grid_locations(box, s, s) for box, s in zip(boxes, sides)]


@pytest.mark.parametrize("sides,num_matches,l2_all", [((3, 3), (4, 2), True), ((3, 3), (9, 9), True),
                                                      ((3, 3), (5, 3), False), ((3, 3, 2, 2), (6, 3), True)])
def test_vicregl_local_loss_equals_the_reference(sides, num_matches, l2_all):
    """Two global views, and (3, 3, 2, 2) multi-crop: two global 3×3 maps and two local 2×2 maps."""
    maps, locations = _random_views(sides)
    loss, terms = vicregl_local_loss(maps, locations, num_matches, l2_all)
    torch.testing.assert_close(loss, reference_local_loss(maps, locations, num_matches, l2_all))
    torch.testing.assert_close(loss, 25 * terms["invariance"] + 25 * terms["variance"] + terms["covariance"])


def test_vicregl_local_loss_identical_views_analytic():
    """One view given twice with its own box: both matchings are the identity, the invariance term is 0 and the
    variance and covariance terms are those of the map's own slots."""
    maps, locations = _random_views((3,))
    loss, terms = vicregl_local_loss([maps[0], maps[0].clone()], [locations[0], locations[0].clone()], (9, 9))
    assert terms["invariance"].item() == 0.0
    _, var, cov = local_vicreg_terms(maps[0], maps[0])
    torch.testing.assert_close(terms["variance"], 2 * var)  # once per matching kind
    torch.testing.assert_close(terms["covariance"], 2 * cov)


def reference_global_loss(embedding, coeffs=(25.0, 25.0, 1.0)):
    """main_vicregl.py ``global_loss`` transcribed (one process)."""
    num_views = len(embedding)
    inv, it = 0.0, 0
    for i in range(2):
        for j in [j for j in range(num_views) if j != i]:
            inv, it = inv + F.mse_loss(embedding[i], embedding[j]), it + 1
    inv = coeffs[0] * inv / it
    var = cov = 0.0
    for x in embedding:
        x = x - x.mean(dim=0)
        var = var + torch.mean(torch.relu(1.0 - torch.sqrt(x.var(dim=0) + 0.0001)))
        cov_x = (x.T @ x) / (x.size(0) - 1)
        cov = cov + _off_diagonal(cov_x).pow(2).sum().div(x.shape[1])
    return inv + coeffs[1] * var / num_views + coeffs[2] * cov / num_views


@pytest.mark.parametrize("views", [2, 3, 5])
def test_vicregl_global_loss_equals_the_reference(views):
    z = [torch.randn(6, 4, **f64) * (i + 1) for i in range(views)]
    torch.testing.assert_close(vicregl_global_loss(z)[0], reference_global_loss(z))


def test_vicregl_global_loss_of_two_views_is_vicreg_with_half_the_covariance_weight():
    z1, z2 = torch.randn(8, 5, **f64), torch.randn(8, 5, **f64)
    torch.testing.assert_close(vicregl_global_loss([z1, z2], cov_weight=3.0)[0], vicreg_loss(z1, z2, cov_weight=1.5)[0])


def test_vicregl_losses_gradcheck():
    maps, locations = _random_views((2, 2), b=3, c=2)
    m1, m2 = (m.clone().requires_grad_(True) for m in maps)
    assert torch.autograd.gradcheck(lambda a, b: vicregl_local_loss([a, b], locations, (3, 2))[0], (m1, m2))
    x, y = torch.randn(4, 2, 3, **f64, requires_grad=True), torch.randn(4, 2, 3, **f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sum(local_vicreg_terms(a, b)), (x, y))
    z = [torch.randn(5, 3, **f64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda *zs: vicregl_global_loss(list(zs))[0], tuple(z))


def test_vicregl_losses_bad_inputs():
    maps, locations = _random_views((2, 2))
    with pytest.raises(ValueError, match="num_matches=5 must be 1–4"):
        vicregl_local_loss(maps, locations, (5, 2))
    with pytest.raises(ValueError, match="at least two views"):
        vicregl_local_loss(maps[:1], locations[:1])
    with pytest.raises(ValueError, match="var_weight"):
        vicregl_global_loss([torch.randn(4, 3)] * 2, var_weight=-1.0)
    with pytest.raises(ValueError, match="at least 2 images"):
        local_vicreg_terms(torch.randn(1, 3, 2), torch.randn(1, 3, 2))
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        grid_locations(torch.randn(3, 2), 2, 2)


# --- the redundancy terms over stacks of batches ------------------------------------------------------

def test_variance_and_covariance_of_a_stack_are_the_mean_over_its_batches():
    z = torch.randn(5, 7, 4, **f64)
    torch.testing.assert_close(variance_loss(z, 1.5), torch.stack([variance_loss(s, 1.5) for s in z]).mean())
    torch.testing.assert_close(covariance_loss(z), torch.stack([covariance_loss(s) for s in z]).mean())
    m = torch.randn(3, 2, 4, 4, **f64)
    got = _off_diagonal(m)
    assert got.shape == (3, 2, 12)
    for idx in [(0, 0), (2, 1)]:
        assert torch.equal(got[idx], _off_diagonal(m[idx]))


def test_two_dimensional_inputs_keep_the_former_formulas_bit_for_bit():
    """The generalised functions on (B, D) against their former 2-D expressions, exactly (same ops, same order)."""
    for b, d in [(2, 1), (9, 5), (64, 96)]:
        z = torch.randn(b, d)
        d_ = z.shape[1]
        zc = z - z.mean(dim=0)
        cov = zc.T @ zc / (b - 1)
        former_cov = cov.flatten()[1:].view(d_ - 1, d_ + 1)[:, :-1].flatten().pow(2).sum() / d_
        former_var = F.relu(1.0 - torch.sqrt(z.var(dim=0) + 1e-4)).mean()
        assert torch.equal(covariance_loss(z), former_cov) and torch.equal(variance_loss(z), former_var)
