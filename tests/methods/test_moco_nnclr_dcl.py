"""MoCo v2/v3, NNCLR, DCL/DCLW: losses against naive loops from the papers, the DCL ↔ NT-Xent identity,
queues (wrap-around, no gradient through stored keys), split BN, and bad inputs refused before training."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_BACKBONES
from spawned import gloo_group
from selfsup.config import ConfigError, ModelConfig, RunConfig
from selfsup.losses.contrastive import dcl_loss, info_nce, nt_xent, vmf_weights
from selfsup.methods import METHODS
from selfsup.methods.base import finish_step, make_progress
from selfsup.nn.backbones import build_backbone
from selfsup.nn.queue import MemoryQueue
from selfsup.train.build import build_method, check_run
from selfsup.views import ViewRecipe

F64 = torch.float64


# ---------------------------------------------------------------- DCL / DCLW losses

def naive_dcl(z1: torch.Tensor, z2: torch.Tensor, tau: float, sigma: float | None = None) -> torch.Tensor:
    """arXiv:2110.06848 eq. 6, literally: for each image i and view k, −w_i·⟨z_i^(1), z_i^(2)⟩/τ plus
    log Σ over l ∈ {1, 2}, j ≠ i of exp(⟨z_i^(k), z_j^(l)⟩/τ); averaged over the 2N terms. σ gives DCLW."""
    n = z1.shape[0]
    u = [z1[i] / z1[i].norm() for i in range(n)], [z2[i] / z2[i].norm() for i in range(n)]
    pos = [torch.dot(u[0][i], u[1][i]) for i in range(n)]
    if sigma is None:
        w = [1.0] * n
    else:
        mean = sum(math.exp(float(p) / sigma) for p in pos) / n
        w = [2 - math.exp(float(p) / sigma) / mean for p in pos]
    total = z1.new_zeros(())
    for k in range(2):
        for i in range(n):
            neg = sum(torch.exp(torch.dot(u[k][i], u[l][j]) / tau) for l in range(2) for j in range(n) if j != i)
            total = total - w[i] * pos[i] / tau + torch.log(neg)
    return total / (2 * n)


@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.1), (5, 8, 0.5), (7, 4, 1.0), (3, 16, 0.07)])
def test_dcl_matches_naive(n, d, tau):
    z1, z2 = torch.randn(n, d, dtype=F64), torch.randn(n, d, dtype=F64)
    torch.testing.assert_close(dcl_loss(z1, z2, tau), naive_dcl(z1, z2, tau))


@pytest.mark.parametrize("n,d,tau,sigma", [(4, 5, 0.1, 0.5), (6, 3, 0.3, 0.2), (3, 8, 1.0, 2.0)])
def test_dclw_matches_naive(n, d, tau, sigma):
    z1, z2 = torch.randn(n, d, dtype=F64), torch.randn(n, d, dtype=F64)
    w = lambda a, b: vmf_weights(a, b, sigma)
    torch.testing.assert_close(dcl_loss(z1, z2, tau, weight_fn=w), naive_dcl(z1, z2, tau, sigma))


@pytest.mark.parametrize("n,tau", [(2, 0.5), (6, 0.1), (9, 1.0)])
def test_nt_xent_minus_dcl_is_exactly_the_positive_in_the_denominator(n, tau):
    """From one similarity matrix S/τ of the 2N views: NT-Xent_i = −pos_i + log(e^pos_i + Σneg_i) and
    DCL_i = −pos_i + log Σneg_i, so NT-Xent − DCL = mean_i log(1 + e^{pos_i − LSE(neg_i)}) exactly."""
    z1, z2 = torch.randn(n, 6, dtype=F64), torch.randn(n, 6, dtype=F64)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    s = z @ z.T / tau
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    pos = s[torch.arange(2 * n), partner]
    neg_mask = ~torch.eye(2 * n, dtype=torch.bool)
    neg_mask[torch.arange(2 * n), partner] = False
    lse_neg = torch.logsumexp(s.masked_fill(~neg_mask, float("-inf")), dim=1)
    removed = F.softplus(pos - lse_neg).mean()  # log(1 + e^pos / Σneg), the positive's share of the denominator
    torch.testing.assert_close(nt_xent(z1, z2, tau) - dcl_loss(z1, z2, tau), removed)
    torch.testing.assert_close(dcl_loss(z1, z2, tau), (lse_neg - pos).mean())
    assert bool((removed > 0).all())  # DCL is always below NT-Xent


def test_dcl_perfectly_aligned_analytic():
    """Identical pairs, orthogonal to every other view: each of the 2N − 2 negatives has cos 0, so
    DCL = −1/τ + log(2N − 2) (NT-Xent would add the positive e^{1/τ} inside the log)."""
    n, tau = 5, 0.2
    z = torch.eye(n, dtype=F64)
    assert dcl_loss(z, z.clone(), tau).item() == pytest.approx(-1 / tau + math.log(2 * n - 2), rel=1e-12)


def test_dcl_invariances():
    z1, z2 = torch.randn(6, 5, dtype=F64), torch.randn(6, 5, dtype=F64)
    for w in (None, vmf_weights):
        base = dcl_loss(z1, z2, 0.3, weight_fn=w)
        torch.testing.assert_close(dcl_loss(2.5 * z1, 0.1 * z2, 0.3, weight_fn=w), base)  # cosine: scale-free
        torch.testing.assert_close(dcl_loss(z2, z1, 0.3, weight_fn=w), base)  # symmetric in the views
        perm = torch.randperm(6)
        torch.testing.assert_close(dcl_loss(z1[perm], z2[perm], 0.3, weight_fn=w), base)  # batch order


def test_vmf_weights_properties():
    z1, z2 = torch.randn(8, 4, dtype=F64), torch.randn(8, 4, dtype=F64)
    w = vmf_weights(z1, z2, 0.5)
    assert w.shape == (8,) and w.mean().item() == pytest.approx(1.0, abs=1e-12)  # E[w] = 1 by construction
    assert bool((w < 2).all())
    cos = F.cosine_similarity(z1, z2)
    assert w.argmax() == cos.argmin() and w.argmin() == cos.argmax()  # hard positives weigh more
    # equal positive similarities: every weight is 1 and DCLW is DCL
    same = F.normalize(torch.randn(5, 3, dtype=F64), dim=1)
    torch.testing.assert_close(vmf_weights(same, same), torch.ones(5, dtype=F64))
    torch.testing.assert_close(dcl_loss(same, same, 0.2, weight_fn=vmf_weights), dcl_loss(same, same, 0.2))
    assert not vmf_weights(z1.requires_grad_(), z2).requires_grad  # a weight, not a loss term


def test_dcl_gradcheck():
    z1 = torch.randn(4, 5, dtype=F64, requires_grad=True)
    z2 = torch.randn(4, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: dcl_loss(a, b, 0.5), (z1, z2))
    # vMF weights are detached by design, so gradcheck the weighted path with fixed weights
    fixed = torch.tensor([0.5, 1.5, 1.2, 0.8], dtype=F64)
    assert torch.autograd.gradcheck(lambda a, b: dcl_loss(a, b, 0.5, weight_fn=lambda *_: fixed), (z1, z2))


@pytest.mark.parametrize("call,match", [
    (lambda: dcl_loss(torch.randn(4, 3), torch.randn(4, 3), 0.0), "temperature"),
    (lambda: dcl_loss(torch.randn(4, 3), torch.randn(4, 3), -0.1), "temperature"),
    (lambda: dcl_loss(torch.randn(4, 3), torch.randn(5, 3), 0.1), "shape"),
    (lambda: dcl_loss(torch.randn(4), torch.randn(4), 0.1), "shape"),
    (lambda: vmf_weights(torch.randn(4, 3), torch.randn(4, 3), sigma=0.0), "sigma"),
])
def test_loss_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _dcl_rank(rank: int, world: int, tmp: str, z1: torch.Tensor, z2: torch.Tensor) -> None:
    out = {}
    with gloo_group(rank, world, init_file=f"{tmp}/init"):
        n = z1.shape[0] // world
        for name, w in (("dcl", None), ("dclw", lambda a, b: vmf_weights(a, b, 0.5, gather=True))):
            a = z1[rank * n:(rank + 1) * n].clone().requires_grad_(True)
            b = z2[rank * n:(rank + 1) * n].clone().requires_grad_(True)
            loss = dcl_loss(a, b, 0.2, weight_fn=w, gather=True)
            loss.backward()
            out[name] = (loss.detach(), a.grad, b.grad)
        torch.save(out, f"{tmp}/rank{rank}.pt")


@pytest.mark.slow
def test_dcl_gather_matches_one_process(tmp_path):
    """Two gloo processes with half the batch each: the mean of their losses is the full-batch loss, and
    the row gradients (summed over ranks by the gather's backward) are world × the full-batch ones."""
    import torch.multiprocessing as mp

    world = 2
    z1, z2 = torch.randn(6, 5, dtype=F64), torch.randn(6, 5, dtype=F64)
    mp.spawn(_dcl_rank, args=(world, str(tmp_path), z1, z2), nprocs=world)
    out = {(name, r): v for r in range(world) for name, v in torch.load(tmp_path / f"rank{r}.pt").items()}
    for name, w in (("dcl", None), ("dclw", vmf_weights)):
        a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        full = dcl_loss(a, b, 0.2, weight_fn=w)
        full.backward()
        losses = [out[(name, r)][0] for r in range(world)]
        torch.testing.assert_close(sum(losses) / world, full.detach())
        torch.testing.assert_close(torch.cat([out[(name, r)][1] for r in range(world)]) / world, a.grad)
        torch.testing.assert_close(torch.cat([out[(name, r)][2] for r in range(world)]) / world, b.grad)


# ---------------------------------------------------------------- methods: tiny helpers

SIZE, BATCH = 16, 8


def tiny(name: str, **params):
    backbone = build_backbone("small_resnet", 1, SIZE, **TINY_BACKBONES["small_resnet"])
    return METHODS[name].cls(backbone, **{**METHODS[name].spec.test_params, **params})


def two_views(n: int = BATCH) -> list[torch.Tensor]:
    return [torch.randn(n, 1, SIZE, SIZE), torch.randn(n, 1, SIZE, SIZE)]


def step(method, views, i: int = 0) -> tuple[torch.Tensor, dict]:
    progress = make_progress(method, i, 100, 0, 10)
    loss, logs = method.training_step(views, progress)
    loss.backward()
    finish_step(method, progress, logs)
    return loss, logs


# ---------------------------------------------------------------- queues

def test_memory_queue_wraps_around():
    q = MemoryQueue(10, 2)
    batches = [torch.arange(i * 8, i * 8 + 8, dtype=torch.float32).repeat(2, 1).T for i in range(3)]  # rows 0..23
    for b in batches:
        q.push(b)
    assert q.full and int(q.ptr) == 24 % 10
    held = sorted(q.contents()[:, 0].tolist())
    assert held == list(range(14, 24))  # the newest 10 rows, whatever their slots
    q.push(torch.full((25, 2), 7.0))  # a push larger than the queue keeps only its newest rows
    assert bool((q.contents() == 7.0).all())


def test_mocov2_queue_holds_the_newest_keys_after_wrap_and_no_gradient():
    torch.manual_seed(0)
    method = tiny("mocov2", queue_size=11, bn_splits=2)  # 11 does not divide the batch of 8
    pushed = []
    for i in range(3):
        loss, logs = step(method, two_views(), i)
        assert torch.isfinite(loss)
        pushed.append(F.normalize(logs["z_pair"], dim=1))
    ptr = int(method.queue.ptr)
    assert method.queue.full and ptr == 24 % 11
    oldest_first = method.queue.rows.roll(-ptr, dims=0)  # the slot at the write pointer is the oldest
    torch.testing.assert_close(oldest_first, torch.cat(pushed)[-11:])
    assert method.queue.rows.grad is None and not method.queue.rows.requires_grad


def test_queue_is_only_written_after_the_step():
    torch.manual_seed(0)
    method = tiny("mocov2", queue_size=16, bn_splits=2)
    views = two_views()
    progress = make_progress(method, 0, 10, 0, 10)
    loss, logs = method.training_step(views, progress)
    assert int(method.queue.count) == 0  # a skipped (non-finite) step would leave the queue untouched
    loss.backward()
    finish_step(method, progress, logs)
    assert int(method.queue.count) == BATCH
    torch.testing.assert_close(method.queue.contents(), F.normalize(logs["z_pair"], dim=1))
    # the next loss uses the queued keys as negatives, and no gradient reaches them
    loss2, _ = method.training_step(two_views(), make_progress(method, 1, 10, 0, 10))
    loss2.backward()
    assert method.queue.rows.grad is None
    assert all(p.grad is None for p in method.key_backbone.parameters())


def test_mocov2_loss_is_info_nce_against_the_queue():
    torch.manual_seed(0)
    method = tiny("mocov2", queue_size=16, bn_splits=1)
    step(method, two_views(), 0)
    method.eval()  # BN on running statistics: the keys are then a plain function of the images
    views = two_views()
    loss, _ = method.training_step(views, make_progress(method, 1, 10, 0, 10))
    q = method.projector(method.backbone(views[0]))
    k = method.key_projector(method.key_backbone(views[1]))
    torch.testing.assert_close(loss, info_nce(q, k, 0.2, negatives=method.queue.contents(), in_batch=False))


def test_mocov2_split_bn_restores_key_order():
    torch.manual_seed(0)
    method = tiny("mocov2", bn_splits=4)
    x = torch.randn(BATCH, 1, SIZE, SIZE)
    plain = lambda: method.key_projector(method.key_backbone(x))
    method.eval()  # running statistics: shuffling and splitting must not change any key
    torch.testing.assert_close(method._keys(x), plain())
    method.train()  # batch statistics: each key now comes from a sub-batch of 2, not the whole batch
    assert not torch.allclose(method._keys(x), plain())


def test_nnclr_nearest_neighbour_and_support_set():
    torch.manual_seed(0)
    method = tiny("nnclr", support_size=11)
    z = torch.randn(4, 16)
    torch.testing.assert_close(method.nearest(z), F.normalize(z, dim=1))  # empty support set: itself
    bank = F.normalize(torch.randn(11, 16), dim=1)
    method.support.push(bank)
    z = bank[[3, 7, 0]] * 5 + 0.01 * torch.randn(3, 16)
    torch.testing.assert_close(method.nearest(z), bank[[3, 7, 0]])
    z.requires_grad_(True)
    assert not method.nearest(z).requires_grad  # no gradient through the lookup


def test_nnclr_loss_and_push_after_step():
    torch.manual_seed(0)
    method = tiny("nnclr", support_size=11)
    for i in range(3):  # 24 rows through a support set of 11: it wraps
        step(method, two_views(), i)
    assert method.support.full and int(method.support.ptr) == 24 % 11
    assert method.support.rows.grad is None
    views = two_views()
    progress = make_progress(method, 3, 10, 0, 10)
    loss, logs = method.training_step(views, progress)
    z1, z2 = logs["z"], logs["z_pair"]
    p1, p2 = method.predictor(torch.cat([z1, z2])).chunk(2)
    expected = 0.5 * (info_nce(method.nearest(z1), p2, 0.1) + info_nce(method.nearest(z2), p1, 0.1))
    torch.testing.assert_close(loss, expected)
    finish_step(method, progress, logs)
    newest = F.normalize(z1, dim=1)
    assert (method.support.contents() @ newest.T).max(dim=0).values.min() > 0.9999


def test_mocov3_loss_and_momentum_schedule():
    torch.manual_seed(0)
    method = tiny("mocov3", temperature=0.2)
    views = two_views()
    loss, _ = method.training_step(views, make_progress(method, 0, 10, 0, 10))
    q1, q2 = (method.predictor(method.projector(method.backbone(v))) for v in views)
    with torch.no_grad():
        k1, k2 = (method.momentum_projector(method.momentum_backbone(v)) for v in views)
    torch.testing.assert_close(loss, 2 * 0.2 * (info_nce(q1, k2, 0.2) + info_nce(q2, k1, 0.2)))
    momentum = lambda k: make_progress(method, k, 100, 0, 10).value("teacher_momentum")
    assert momentum(0) == pytest.approx(0.99)
    assert momentum(50) == pytest.approx(0.995)
    assert momentum(100) == pytest.approx(1.0)
    assert isinstance(method.projector[-1], torch.nn.BatchNorm1d) and not method.projector[-1].affine


# ---------------------------------------------------------------- bad inputs, refused before training

@pytest.mark.parametrize("name,params,match", [
    ("mocov2", {"temperature": 0.0}, "temperature"),
    ("mocov2", {"momentum_start": 1.5}, "momentum_start"),
    ("mocov2", {"queue_size": 0}, "queue_size"),
    ("mocov3", {"temperature": -1.0}, "temperature"),
    ("mocov3", {"momentum_start": -0.1}, "momentum_start"),
    ("nnclr", {"temperature": 0.0}, "temperature"),
    ("nnclr", {"support_size": 0}, "support_size"),
    ("dcl", {"temperature": 0.0}, "temperature"),
    ("dclw", {"temperature": 0.0}, "temperature"),
    ("dclw", {"sigma": 0.0}, "sigma"),
])
def test_constructor_rejects_impossible_values(name, params, match):
    with pytest.raises(ValueError, match=match):
        tiny(name, **params)
    cfg = RunConfig(method=ModelConfig(name, params), backbone=ModelConfig("small_resnet", {"widths": [8, 16]}))
    with pytest.raises(ConfigError, match=match):  # what `selfsup pretrain` reports before training
        build_method(cfg, 1, SIZE)


@pytest.mark.parametrize("name,params,n_train,match", [
    ("mocov2", {"queue_size": 4096}, 1000, "queue"),
    ("mocov2", {"queue_size": 64, "bn_splits": 8}, 1000, "bn_splits"),
    ("nnclr", {"support_size": 4096}, 1000, "support set"),
])
def test_check_run_refuses_memory_larger_than_the_data(name, params, n_train, match):
    cfg = RunConfig(method=ModelConfig(name, params), backbone=ModelConfig("small_resnet", {"widths": [8, 16]}))
    cfg.train.batch_size = 8
    model = build_method(cfg, 1, SIZE)
    with pytest.raises(ConfigError, match=match):
        check_run(model, cfg, n_train, ViewRecipe())
    cfg.train.batch_size = 256
    check_run(model, cfg, 100_000, ViewRecipe())  # enough data and images per BN sub-batch: accepted


